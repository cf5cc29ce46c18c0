"""Grading math answers: the scorers that both training rewards and evaluation use."""

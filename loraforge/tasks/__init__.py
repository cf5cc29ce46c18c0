"""Built-in tasks with verifiable answers, for training (`--data`) and evaluation (`--bench`)."""

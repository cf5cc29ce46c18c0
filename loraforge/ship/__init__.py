"""Shipping adapters: verify, convert, push to the Hub, inspect (the paper's diagnostics) and plots."""

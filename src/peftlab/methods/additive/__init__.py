"""Additive PEFT methods."""

"""Hybrid PEFT methods."""

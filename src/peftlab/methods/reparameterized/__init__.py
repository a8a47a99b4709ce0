"""Reparameterized PEFT methods."""

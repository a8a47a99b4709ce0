"""Unified PEFT methods."""

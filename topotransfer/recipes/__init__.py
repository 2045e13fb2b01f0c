"""Recipes: complete runs built from the library (growth from scratch, transfer adaptation)."""

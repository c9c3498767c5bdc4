"""Compatibility names for the recipes, which now live in :mod:`branchify.recipes` (installed with
branchify, so ``python -m branchify.recipes.<name>`` works from a wheel too). ``python -m
recipes.<name>`` keeps working from a checkout of the repository; this folder is not installed."""

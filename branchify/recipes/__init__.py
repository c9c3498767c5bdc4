"""Recipes for branchify: CIFAR-style model zoo and in-memory data loaders for online-KD experiments."""

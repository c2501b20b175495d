"""Reproductions of published log-likelihood tables: configs, Burda et al.'s schedule and the runner."""

__all__ = ["schedule"]

"""Declarative rules: the rules file's model and the engines that run it."""

from rules.config import RulesConfig, load_rules

__all__ = ["RulesConfig", "load_rules"]

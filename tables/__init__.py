"""Faust tables of the service, found by autodiscovery."""

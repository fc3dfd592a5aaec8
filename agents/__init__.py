"""Faust agents of the service, found by autodiscovery."""

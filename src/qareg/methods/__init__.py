"""Rival compression methods, each a pure tensor function (later a config and a handler too)."""

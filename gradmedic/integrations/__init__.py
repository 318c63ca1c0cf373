"""Integrations with the tools people train with. Each module imports its framework lazily, so that
``import gradmedic`` never imports any of them; import the one you need by its full name."""

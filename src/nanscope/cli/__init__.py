"""The ``nanscope`` command: parses arguments, calls the API, renders. No logic lives here."""

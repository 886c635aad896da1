"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class VoiceAgentError(Exception):
    """Base: the message says what went wrong and what to do."""


class AudioInputError(VoiceAgentError):
    """Audio that cannot be read or used (missing, empty, unreadable, NaN...)."""


class CheckpointError(VoiceAgentError):
    """A model file is missing, mis-shaped or of an unknown format."""


class ConversionError(VoiceAgentError):
    """A shipped model could not be converted into the layout its loader reads."""


class ConfigError(VoiceAgentError):
    """A config file or override is wrong (unknown key, bad type)."""


class TextInputError(VoiceAgentError):
    """Text a stage cannot use (empty, too long for the model's window)."""

"""Errors meant for the person running asyndgan: each carries a one-line message naming the problem."""


class AsynDGANError(Exception):
    """A problem the user can fix (bad path, bad config value, unreachable server). CLIs print it on one line."""


class ConfigError(AsynDGANError):
    """A configuration value is missing or out of range."""


class DataError(AsynDGANError):
    """A site's data folder is missing, empty or unreadable."""


class ProtocolError(AsynDGANError):
    """A peer sent a message that breaks the protocol (wrong order, wrong shape, bad dtype, non-finite values)."""


class PrivacyBudgetExhausted(AsynDGANError):
    """The site's next answer would spend more differential privacy than its budget allows."""

"""orchestratord: an always-on supervisor for opencode serve and its agent teams."""

__version__ = "0.1.0"

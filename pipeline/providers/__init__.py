"""The provider registry: id -> provider class. Adding a provider is one line here."""

from __future__ import annotations

from importlib import import_module

from pipeline.providers.base import Fetched, PollOutcome, Provider
from pipeline.runtime import BuiltOnce, get_runtime

REGISTRY: dict[str, str] = {
    "baidu": "pipeline.providers.baidu:BaiduProvider",
    "idp": "pipeline.providers.idp:IdpProvider",
    "tuputech": "pipeline.providers.tuputech:TuputechProvider",
}


def provider_names() -> list[str]:
    return list(REGISTRY)


def provider_class(name: str) -> type[Provider]:
    try:
        module_name, _, attr = REGISTRY[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(REGISTRY)}") from None
    return getattr(import_module(module_name), attr)


@BuiltOnce
def get_provider(name: str) -> Provider:
    """The process' instance of a provider, bound to the process' runtime."""
    return provider_class(name)(get_runtime())


__all__ = ["Fetched", "PollOutcome", "Provider", "get_provider", "provider_class", "provider_names"]

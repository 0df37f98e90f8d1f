"""The image config of an OCI image: what ``pyvmm run --image`` needs from it.

OCI image-spec v1.0 "config.md": ``config.Env`` (list of ``KEY=VALUE``),
``config.Entrypoint`` and ``config.Cmd`` (lists of strings), ``config.WorkingDir``,
``config.User`` (``user``, ``uid``, ``user:group``, ``uid:gid``, ...),
``config.Labels`` (string map), plus top-level ``created``, ``architecture``, ``os``.
Every field is optional in the spec; a present field of the wrong type is refused.
"""

from __future__ import annotations

import json

from vmm.errors import UserError


class ConfigError(UserError):
    """An image config that is not valid JSON or not what the OCI spec says."""


def _strings(value, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"image config: {field} is not a list of strings (OCI config.md)")
    return list(value)


class ImageConfig:
    """The parts of an OCI image config pyvmm uses (plain record).

    Attributes:
        env: ``KEY=VALUE`` strings, in order; entrypoint, cmd: argument lists;
        workdir: ``""`` when unset; user: ``""`` when unset (root); labels: dict;
        created: RFC 3339 string or ``""``; architecture, os: as the config says.
    """

    __slots__ = ("env", "entrypoint", "cmd", "workdir", "user", "labels", "created",
                 "architecture", "os")

    def __init__(self, env=(), entrypoint=(), cmd=(), workdir="", user="", labels=None,
                 created="", architecture="amd64", os="linux"):
        self.env = list(env)
        self.entrypoint = list(entrypoint)
        self.cmd = list(cmd)
        self.workdir = workdir
        self.user = user
        self.labels = dict(labels or {})
        self.created = created
        self.architecture = architecture
        self.os = os

    @classmethod
    def from_json(cls, data: bytes | str) -> "ImageConfig":
        """Parse an OCI image config blob.

        Raises:
            ConfigError: not JSON, not an object, or a field of the wrong type.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"image config is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError("image config is not a JSON object (OCI config.md)")
        c = doc.get("config")
        c = {} if c is None else c
        if not isinstance(c, dict):
            raise ConfigError("image config: config is not an object (OCI config.md)")
        env = _strings(c.get("Env"), "Env")
        for item in env:
            if "=" not in item:
                raise ConfigError(f"image config: Env entry {item!r} is not KEY=VALUE")
        labels = c.get("Labels")
        labels = {} if labels is None else labels
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ConfigError("image config: Labels is not a map of strings (OCI config.md)")
        fields = {}
        for key, name in (("WorkingDir", "workdir"), ("User", "user")):
            value = c.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"image config: {key} is not a string (OCI config.md)")
            fields[name] = value or ""
        for key in ("created", "architecture", "os"):
            value = doc.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"image config: {key} is not a string (OCI config.md)")
            fields[key] = value or ""
        return cls(env=env, entrypoint=_strings(c.get("Entrypoint"), "Entrypoint"),
                   cmd=_strings(c.get("Cmd"), "Cmd"), labels=labels, **fields)

    def command(self, args: list[str] | None = None) -> list[str]:
        """What ``podman run IMAGE [ARGS]`` runs: Entrypoint + (ARGS if given, else Cmd)."""
        return self.entrypoint + (list(args) if args else self.cmd)

    def environment(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """The image's Env as a dict, with ``overrides`` (``-e K=V``) applied on top."""
        env = {}
        for item in self.env:
            key, _, value = item.partition("=")
            env[key] = value
        env.update(overrides or {})
        return env

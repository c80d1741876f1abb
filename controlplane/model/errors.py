"""The one validation error type of the model.

It names where the object came from (a file or a cluster), the object, and the field, so a user can act on it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A resource that cannot be accepted, with enough context to find and fix it."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        obj: str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.obj = obj
        self.field = field
        super().__init__(str(self))

    def with_context(self, *, source: str | None = None, obj: str | None = None) -> ConfigError:
        return ConfigError(
            self.message,
            source=self.source or source,
            obj=self.obj or obj,
            field=self.field,
        )

    def __str__(self) -> str:
        where = []
        if self.source:
            where.append(self.source)
        if self.obj:
            where.append(self.obj)
        if self.field:
            where.append(f"field {self.field}")
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

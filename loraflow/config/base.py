"""The base every config model derives from: unknown keys are errors, never silently ignored."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys and validates on assignment. Errors do not echo the refused
    value (a database URL with a password is refused, and must not be printed back in the error)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

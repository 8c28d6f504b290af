"""What every Python model of this repository shares: its config's parameters, and errors with a
status code (numpy-free, standard library only).

Each model's file puts the repository's folder on ``sys.path`` and imports this module plainly
(Triton loads only folders as models, so modules beside them are shared code). Triton's Python
utilities are imported where an error is made, so the module imports without them too.
"""

__all__ = ["config_parameters", "invalid_argument", "unavailable", "failed"]


def config_parameters(config):
    """A model config's ``parameters`` (the parsed JSON of ``args["model_config"]``) as a
    name -> string dict."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _error(message, status):
    """A TritonError with ``status`` (a ``TritonError`` code name) where this Triton version has
    error codes, else without one."""
    import triton_python_backend_utils as pb_utils

    code = getattr(pb_utils.TritonError, status, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def invalid_argument(message):
    """A request the model cannot serve as sent (INVALID_ARGUMENT): a bad image, option or row."""
    return _error(message, "INVALID_ARG")


def unavailable(message):
    """A request the model cannot serve now (UNAVAILABLE): overloaded, retry later."""
    return _error(message, "UNAVAILABLE")


def failed(message):
    """A request the model failed on (INTERNAL): e.g. out of memory; the others are served."""
    return _error(message, "INTERNAL")

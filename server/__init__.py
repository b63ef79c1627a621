"""lorafleet server: one frozen base model, many tenants' adapters, one batch."""


def version() -> str:
    """The installed lorafleet distribution's version ('0+unknown' when run from a tree not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("lorafleet")
    except PackageNotFoundError:
        return "0+unknown"

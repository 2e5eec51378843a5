"""Locating bundle folders, so configs work from any working directory, and checking a run's settings."""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_components.errors import GuideGenInputError

__all__ = ["bundle_dir", "bundle_config", "refuse_unknown_overrides"]

logger = logging.getLogger(__name__)


def bundle_dir(name: str) -> str:
    """Absolute path of a GuideGen bundle folder (the one holding ``configs/metadata.json``).

    Looked up, in order, on ``sys.path`` (``python -m monai.bundle run`` puts the running bundle's folder
    there, also for a bundle downloaded from the model zoo) and in this source tree's ``bundles/`` folder.

    Args:
        name: bundle name, e.g. ``guidegen_tcss``.

    Raises:
        GuideGenInputError: the bundle cannot be found (pass ``--bundle_root`` then).
    """
    candidates = [Path(entry) for entry in sys.path if entry and Path(entry).name == name]
    candidates.append(Path(__file__).resolve().parents[1] / "bundles" / name)
    for candidate in candidates:
        if (candidate / "configs" / "metadata.json").is_file():
            return str(candidate.resolve())
    raise GuideGenInputError(f"bundle '{name}' not found on sys.path or in the source tree; pass --bundle_root <folder>")


def bundle_config(name: str, config_name: str = "inference.yaml", overrides: Mapping[str, Any] | None = None) -> Any:
    """A sibling bundle's config, parsed from its absolute path with ``overrides`` applied.

    This is how the meta-bundle chains the stage bundles: it reads their own inference configs (so each stage's
    schedule, clipping and defaults stay defined in one place) without MONAI's ``%file#id`` macros, which resolve
    relative to the working directory. Overrides whose value is None are left out, so the sibling's default holds.

    Args:
        name: bundle name, e.g. ``guidegen_ldm``.
        config_name: file under the bundle's ``configs/``.
        overrides: config id -> value.

    Returns:
        a :class:`monai.bundle.ConfigParser`; ``parser.get_parsed_content(id)`` builds a component.

    Raises:
        GuideGenInputError: the bundle or its config cannot be found.
    """
    from monai.bundle import ConfigParser

    path = Path(bundle_dir(name)) / "configs" / config_name
    if not path.is_file():
        raise GuideGenInputError(f"bundle '{name}' has no configs/{config_name} (looked at {path})")
    parser = ConfigParser()
    parser.read_config(str(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            parser[key] = value
    return parser


def _running_workflow() -> Any:
    """The ``monai.bundle`` ConfigWorkflow whose ``initialize`` list is being evaluated (None outside one).

    A config expression sees only the config's own ids, not the parser holding the merged settings, so the
    workflow is found on the call stack: ``ConfigWorkflow.initialize`` evaluates its list in its own methods.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigWorkflow):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _defined_settings(config_dir: Path) -> set[str]:
    """Top-level ids that the bundle's own config files define, plus those MONAI itself adds to a run."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    defined = {ConfigParser.meta_key}
    for path in sorted(config_dir.glob("*")):
        if path.suffix.lower() in {".yaml", ".yml", ".json"} and path.name != "metadata.json":
            defined |= set(ConfigParser.load_config_file(str(path)) or {})
    # `--tracking mlflow` adds its settings (tracking_uri, save_execute_config, ...) as top-level ids
    for tracking in DEFAULT_EXP_MGMT_SETTINGS.values():
        defined |= set(tracking["configs"]) - set(tracking["handlers_id"])
    return defined


def _input_error_in(error: BaseException | None) -> GuideGenInputError | None:
    """The :class:`GuideGenInputError` behind an exception (MONAI wraps errors of config expressions in others)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and not isinstance(error, GuideGenInputError):
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error if isinstance(error, GuideGenInputError) else None


def _report_input_errors_plainly() -> None:
    """Make an uncaught bad-input error end this ``monai.bundle run`` with a message instead of a traceback.

    ``python -m monai.bundle`` lets every exception reach the interpreter, which prints a traceback of MONAI's config
    machinery around a message that already names the setting and the fix. Other exceptions (bugs) keep their
    traceback; the exit status stays 1.
    """
    previous = sys.excepthook
    if getattr(previous, "guidegen_plain_input_errors", False):
        return

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        reason = _input_error_in(error)
        if reason is None:
            previous(kind, error, trace)
        else:
            print(f"guidegen: error: {reason}", file=sys.stderr)

    hook.guidegen_plain_input_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def refuse_unknown_overrides() -> None:
    """Stop a ``monai.bundle run`` whose settings include a top-level id that no config of the bundle defines.

    Being the first step of every GuideGen config's ``initialize`` list, it also makes bad input found later in the
    run (a missing file, a step count the model's schedule does not have) end with a message instead of a traceback.

    MONAI adds any ``--name value`` to the config, used or not, so a misspelt setting (``--max_epoch 1`` for
    ``--max_epochs``) is silently ignored and the run goes on with the default. Each GuideGen config calls this
    first in its ``initialize`` list, before anything is built. The ids allowed are those of every config file
    in the bundle's config folder (MONAI's config root: the folder of the first ``--config_file``), so the same
    check covers command-line settings and the keys of extra override files.

    Raises:
        GuideGenInputError: one or more unknown settings, each with the closest defined name.
    """
    workflow = _running_workflow()
    if workflow is None:  # a config evaluated outside `monai.bundle run` (nothing was given on a command line)
        logger.debug("refuse_unknown_overrides: not inside a monai.bundle workflow; nothing to check")
        return
    _report_input_errors_plainly()
    config_dir = Path(workflow.config_root_path)
    defined = _defined_settings(config_dir)
    unknown = [key for key in workflow.parser.get() if key not in defined]
    if not unknown:
        return
    problems = []
    for key in unknown:
        closest = difflib.get_close_matches(key, sorted(defined), n=1, cutoff=0.6)
        problems.append(f"--{key}" + (f" (did you mean --{closest[0]}?)" if closest else ""))
    raise GuideGenInputError(
        f"unknown setting(s) {', '.join(problems)}: no config in {config_dir} defines "
        f"{'it' if len(unknown) == 1 else 'them'}, so the run would ignore {'it' if len(unknown) == 1 else 'them'}; "
        "correct the spelling on the command line (or in your override file). The settings are the top-level keys "
        f"of {config_dir}/*.yaml."
    )

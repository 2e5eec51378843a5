"""Locating bundle folders, so configs work from any working directory, and checking a run's settings.

A bundle's folder (``bundle_root``) is the folder its config file sits in (the parent of ``configs/``), wherever
``monai.bundle download`` put it; the other GuideGen bundles are its siblings there (one ``--bundle_dir``). Only
code that runs outside any bundle (``guidegen generate`` from a source checkout, a config parsed in Python) falls
back to this source tree's ``bundles/`` folder.

Every GuideGen config sets ``bundle_root`` with the same expression (:data:`BUNDLE_ROOT_EXPRESSION`): it takes the
config's folder from the running ``monai.bundle`` workflow and puts it first on ``sys.path`` before anything of
``custom_components`` is used, so that the copy of the package that ``guidegen package`` ships inside the bundle is
importable from any working directory, without an install (``python -m monai.bundle run`` adds the bundle's
folder to ``sys.path`` itself, but only after ``initialize``, and it evaluates ``imports`` before that).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_components.errors import GuideGenInputError

__all__ = [
    "BUNDLE_ROOT_EXPRESSION",
    "bundle_dir",
    "bundle_config",
    "refuse_unknown_overrides",
    "running_bundle_root",
]

logger = logging.getLogger(__name__)

# The `bundle_root` line of every GuideGen config (with the bundle's name). Pure Python up to the call, because it
# runs where `custom_components` may not be importable yet: the folder of each running ConfigWorkflow on the call
# stack (its configs/ folder's parent) goes first on sys.path; running_bundle_root then redoes the config's imports
# (they failed before the folder was on the path) and returns the folder. For this to come before any other use of
# custom_components, the first item of every config's `initialize` refers to @bundle_root; with `--tracking`, MONAI
# resolves `output_dir` (so @bundle_root) even earlier, in the workflow's constructor, which works the same way.
BUNDLE_ROOT_EXPRESSION = (
    "$[__import__('sys').path.insert(0, str(r.parent if r.name == 'configs' else r)) "
    "for f, _ in __import__('traceback').walk_stack(None) for w in [f.f_locals.get('self')] "
    "if isinstance(w, __import__('monai.bundle').bundle.ConfigWorkflow) for r in [w.config_root_path.resolve()]][:0] or "
    "__import__('custom_components.bundles').bundles.running_bundle_root('{name}')"
)


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def _workflow_root(workflow: Any) -> Path:
    """The bundle folder of a ConfigWorkflow: its config root, or the parent of it when that is ``configs/``
    (MONAI's own rule when it adds the bundle to ``sys.path``)."""
    config_root = Path(workflow.config_root_path).resolve()
    return config_root.parent if config_root.name == "configs" else config_root


def _shipped_root() -> Path | None:
    """The bundle this package was shipped in (``<bundle>/custom_components``), or None in a source tree/install."""
    folder = Path(__file__).resolve().parents[1]
    return folder if _is_bundle(folder) else None


def _source_tree_bundles() -> Path:
    return Path(__file__).resolve().parents[1] / "bundles"


def _redo_imports(parser: Any) -> None:
    """Evaluate the config's ``$import ...`` items again, now that the bundle is on ``sys.path``.

    MONAI evaluates them all before the first item it resolves; those that failed hold a placeholder that raises
    when used. Evaluating them again replaces the placeholders in the parser's globals (shared by its expressions).
    """
    from monai.bundle.config_item import ConfigExpression

    resolver = parser.ref_resolver
    for item_id, item in list(resolver.items.items()):
        if isinstance(item, ConfigExpression) and ConfigExpression.is_import_statement(item.get_config()):
            module = item.evaluate()
            if item_id in resolver.resolved_content:
                resolver.resolved_content[item_id] = module


def running_bundle_root(name: str) -> str:
    """``bundle_root`` of a GuideGen config: the folder of the config being run, else the bundle ``name``.

    Inside ``monai.bundle run`` (or any :class:`monai.bundle.ConfigWorkflow`) it is the folder the first config file
    sits in (the parent of ``configs/``), whatever the working directory: a downloaded bundle uses its own weights.
    The folder is put first on ``sys.path`` (once) and the config's imports are redone, so the ``custom_components``
    shipped in the bundle is used when no other copy is installed. Outside a workflow (a config parsed in Python)
    it is :func:`bundle_dir` of ``name``.

    Args:
        name: the bundle the config belongs to, e.g. ``guidegen_tcss`` (used outside a workflow only).
    """
    workflow = _running_workflow()
    if workflow is None:
        return bundle_dir(name)
    root = _workflow_root(workflow)
    entry = str(root)
    sys.path[:] = [entry] + [p for p in sys.path if p != entry]
    _redo_imports(workflow.parser)
    code = sys.modules.get("custom_components")
    logger.debug("bundle %s at %s; custom_components from %s", name, root, getattr(code, "__file__", None))
    return entry


def bundle_dir(name: str, near: str | None = None) -> str:
    """Absolute path of a GuideGen bundle folder (the one holding ``configs/metadata.json``).

    Looked up next to a bundle, never silently elsewhere: next to ``near`` when given, else next to the bundle whose
    config is being run (``monai.bundle run``) or the bundle this code was shipped in — the layout
    ``monai.bundle download --bundle_dir <dir>`` makes (``<dir>/<name>/``). Only without any of these (a source
    checkout used from Python or ``guidegen generate``) is it this source tree's ``bundles/<name>``.

    Args:
        name: bundle name, e.g. ``guidegen_tcss``.
        near: a bundle folder whose sibling (or itself, if so named) is wanted.

    Raises:
        GuideGenInputError: the bundle is not where it should be, with the download command that puts it there.
    """
    if near is not None:
        anchors = [Path(near).resolve()]
    else:
        workflow = _running_workflow()
        anchors = [root for root in (_workflow_root(workflow) if workflow is not None else None, _shipped_root()) if root]
    for anchor in anchors:
        for candidate in (anchor, anchor.parent / name):
            if candidate.name == name and _is_bundle(candidate):
                return str(candidate)
    if anchors:
        folder = anchors[0].parent
        raise GuideGenInputError(
            f"bundle '{name}' not found next to {anchors[0]} (looked for {folder / name}/configs/metadata.json): "
            f"the GuideGen bundles belong in one folder; download it there with `python -m monai.bundle download "
            f"--name {name} --bundle_dir {folder}` (or --url file://<{name}_v<version>.zip>)"
        )
    candidate = _source_tree_bundles() / name
    if _is_bundle(candidate):
        return str(candidate)
    raise GuideGenInputError(
        f"bundle '{name}' not found: no bundle is running and {candidate} does not exist; run the bundle's own "
        "config with `python -m monai.bundle run`, or download the GuideGen bundles into one folder"
    )


def bundle_config(name: str, config_name: str = "inference.yaml", overrides: Mapping[str, Any] | None = None) -> Any:
    """A sibling bundle's config, parsed from its absolute path with ``overrides`` applied.

    This is how the meta-bundle chains the stage bundles: it reads their own inference configs (so each stage's
    schedule, clipping and defaults stay defined in one place) without MONAI's ``%file#id`` macros, which resolve
    relative to the working directory. The config's ``bundle_root`` is set to the sibling's folder (found by
    :func:`bundle_dir`), so its default model file is its own. Overrides whose value is None are left out, so the
    sibling's default holds.

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

    root = bundle_dir(name)
    path = Path(root) / "configs" / config_name
    if not path.is_file():
        raise GuideGenInputError(f"bundle '{name}' has no configs/{config_name} (looked at {path})")
    parser = ConfigParser()
    parser.read_config(str(path))
    parser["bundle_root"] = root
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


def refuse_unknown_overrides(bundle_root: str | None = None) -> None:
    """Stop a ``monai.bundle run`` whose settings include a top-level id that no config of the bundle defines.

    The configs call it as ``refuse_unknown_overrides(@bundle_root)``: the reference makes MONAI resolve
    ``bundle_root`` first, which puts the bundle (and the ``custom_components`` shipped in it) on ``sys.path``
    before this call needs it (see :data:`BUNDLE_ROOT_EXPRESSION`); the value itself is not used.

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

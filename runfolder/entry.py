"""The entry points' first step (issue 32): the command line composed into the stage's config with Hydra's own
compose API, and checked, before ``@hydra.main`` runs.

Hydra makes its output folder (``hydra.run.dir``, under the run folder) and opens the job's log file before it
calls the task function, and the stages load their models inside it; so a command is checked here, in the same
process, before any of that: a refused command has written nothing and loaded nothing. With ``-m`` every job
of the sweep (the command line's sweeps and ``hydra.sweeper.params``) is composed and checked.

Exit codes: :data:`BAD_INPUT` (2) for a command refused for its input, with one line on stderr naming the field
and the fix; :data:`RUN_FAILURE` (1) for a failure while running.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BAD_INPUT = 2
RUN_FAILURE = 1
# Hydra's flags that print or inspect instead of running the task: nothing to check then
_INSPECTING = ("help", "hydra_help", "cfg", "info", "shell_completion")
_CHECKED: dict[str, Any] = {}  # a composed config's key -> what its check returned (see prechecked)


class BadInput(ValueError):
    """A command refused for its input; the one-line message names the field and the fix."""


def one_line(message: object) -> str:
    """A message as one line: omegaconf's ``full_key:``/``object_type=`` context lines dropped, the rest joined."""
    lines = [ln.strip() for ln in str(message).strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("full_key:", "object_type=", "reference_type=", "See https://"))]
    return " ".join(lines) or type(message).__name__


def refuse(stage: str, err: object) -> NoReturn:
    """Ends the process with one line ``<stage>: <message>`` and exit code 2."""
    print(f"{stage}: {one_line(err)}", file=sys.stderr)
    raise SystemExit(BAD_INPUT)


def fail(stage: str, err: object) -> NoReturn:
    """Ends the process with one line ``<stage>: <message>`` and exit code 1 (a failure at run time)."""
    print(f"{stage}: {one_line(err)}", file=sys.stderr)
    raise SystemExit(RUN_FAILURE)


def _composition_error(err: Exception) -> BadInput:
    """Hydra's composition errors (several lines, the config search path) as one line naming the override."""
    text = str(err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if "Could not find" in first and "Available options in" in text:
        group = text.split("Available options in", 1)[1].split(":", 1)[0].strip().strip("'")
        options = [ln.strip() for ln in text.split("Available options in", 1)[1].split("\n")[1:]
                   if ln.startswith("\t") and "provider=" not in ln]
        option = first.split("Could not find", 1)[1].strip().strip("'")
        return BadInput(f"{group}: no config {option}.yaml; choose one of {', '.join(options)} ({group}=NAME)")
    if first.startswith("Could not override"):
        key = first.split("'")[1] if "'" in first else first
        return BadInput(f"{key}: no such key in the config; check its spelling (or add a new key with +{key}=...)")
    return BadInput(f"command line: {one_line(text)}")


def _check_syntax(overrides: Sequence[str]) -> None:
    """Each override readable by Hydra's grammar, else :class:`BadInput` naming its key (Hydra's own message names
    only the characters it stopped at)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_overrides([line])
        except HydraException as err:
            key, _, value = line.partition("=")
            raise BadInput(f"{key or line}: Hydra cannot read {line!r} ({one_line(err)}); quote a value with special "
                           f"characters, e.g. {key}='{value}'") from None


def _jobs(overrides: Sequence[str], sweeper_params: dict | None) -> list[list[str]]:
    """The override lists of a multirun's jobs: the config's ``hydra.sweeper.params`` then the command line
    (a later override of the same key wins), sweeps expanded as Hydra's basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(overrides)
    by_key: dict[str, Any] = {}
    for o in OverridesParser.create().parse_overrides(lines):
        by_key[o.key_or_group] = o
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in by_key.values()]
    return [list(job) for job in itertools.product(*choices)]


def _first_values(overrides: Sequence[str]) -> list[str]:
    """The command line with each sweep replaced by its first value (to compose the config's sweeper params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
                   else o.input_line)
    return out


def composed(config_name: str, overrides: Sequence[str], multirun: bool = False,
             config_dir: Path = CONF_DIR) -> Iterator:
    """Each job's config (without its ``hydra`` node), composed by Hydra's compose API; :class:`BadInput` for an
    override Hydra cannot apply."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    def one(job: Sequence[str], with_hydra: bool = False):
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name=config_name):
                cfg = compose(config_name, overrides=list(job), return_hydra_config=with_hydra)
        except HydraException as err:
            raise _composition_error(err) from None
        return cfg

    jobs = [list(overrides)]
    if multirun:
        first = one(_first_values(overrides), with_hydra=True)
        params = OmegaConf.select(first, "hydra.sweeper.params", default=None)
        jobs = _jobs(overrides, OmegaConf.to_container(params) if params is not None else None)
    for job in jobs:
        cfg = one(job)
        with open_dict(cfg):
            cfg.pop("hydra", None)
        yield cfg


def _key(cfg) -> str | None:
    from omegaconf import OmegaConf

    try:
        return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 - a config that does not resolve has no key (its check refused it)
        return None


def prechecked(cfg) -> Any:
    """What the check of :func:`check_command` returned for this config (the same job composed by Hydra), or
    ``None``: the task function reuses it instead of checking again."""
    key = _key(cfg)
    return _CHECKED.get(key) if key is not None else None


def _missing_keys(node, prefix: str = "") -> Iterator[str]:
    """The ``???`` keys of a config, found without resolving any interpolation (``OmegaConf.missing_keys``
    resolves them: ``${device:}`` imports torch, and one that points at a missing key raises)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        name = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix[:-1]}[{key}]"
        if OmegaConf.is_missing(node, key):
            yield name
        elif not OmegaConf.is_interpolation(node, key):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
                yield from _missing_keys(child, f"{name}.")


def check_required(cfg, hints: dict[str, str] | None = None, allow_missing: Sequence[str] = ()) -> None:
    """Every ``???`` key given, else :class:`BadInput` naming the first and how to give it."""
    hints = hints or {}
    for key in _missing_keys(cfg):
        if key not in allow_missing:
            raise BadInput(f"{key}: required, and not given; give {hints.get(key, f'{key}=...')}")


def check_resolvable(cfg, allow_missing: Sequence[str] = ()) -> None:
    """Every interpolation resolvable (an ``${oc.env:...}`` without its variable), else :class:`BadInput`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationToMissingValueError:
        if not allow_missing:  # else the stage's check said what to give
            raise
    except Exception as err:  # noqa: BLE001 - omegaconf and the resolvers raise many types
        raise _value_error(err) from None


def _value_error(err: Exception) -> BadInput:
    key = getattr(err, "full_key", None) or "config"
    return BadInput(f"{key}: {one_line(str(err))}; fix the value (or the environment variable it reads)")


def check_command(stage: str, config_name: str, check: Callable[[Any], Any],
                  errors: Callable[[], tuple] = tuple, argv: Sequence[str] | None = None,
                  hints: dict[str, str] | None = None, allow_missing: Sequence[str] = ()) -> None:
    """The pre-Hydra pass of an entry point: the command line (``argv``, default ``sys.argv``) composed into
    each job's config, every required key checked, then ``check(cfg)`` and every interpolation resolved; a
    :class:`BadInput`, a :class:`~runfolder.RunFolderError` or one of the stage's ``errors()`` ends the process
    with one line and exit code 2. ``errors`` is called only when something was raised: its classes live in
    modules that import torch, which a quick refusal should not wait for. What ``check`` returns is kept for
    :func:`prechecked`. Hydra's inspecting flags (``--help``, ``--cfg``, ``--info``) skip the check."""
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself uses

    from runfolder.console import quiet_libraries

    quiet_libraries()  # the check reads tokenizers: no library chatter

    argv = list(sys.argv if argv is None else argv)
    args = get_args_parser().parse_args(argv[1:])  # an unknown flag: argparse's usage line and exit code 2
    if any(getattr(args, flag, None) for flag in _INSPECTING):
        return
    config_dir = CONF_DIR
    if args.config_path:
        config_dir = (Path(argv[0]).resolve().parent / args.config_path).resolve()
    name = args.config_name or config_name
    overrides = list(args.overrides)
    if args.config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    from omegaconf.errors import OmegaConfBaseException

    try:
        _check_syntax(overrides)
        jobs = list(composed(name, overrides, bool(args.multirun), config_dir))  # every job composes, first
        for cfg in jobs:
            check_required(cfg, hints, allow_missing)
        for cfg in jobs:
            try:
                result = check(cfg)
            except OmegaConfBaseException as err:  # a value the check read that does not resolve
                raise _value_error(err) from None
            check_resolvable(cfg, allow_missing)
            key = _key(cfg)
            if key is not None:
                _CHECKED[key] = result
    except Exception as err:  # noqa: BLE001 - classified below; anything else is a failure, with its traceback
        from runfolder import RunFolderError

        if isinstance(err, (BadInput, RunFolderError)) or isinstance(err, tuple(errors())):
            refuse(stage, err)
        raise

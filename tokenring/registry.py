"""Finding, validating and choosing backends, and finding the schedules.

Discovery loads the first-party schedule modules (`tokenring.schedules`) and
every entry point of the ``tokenring.backends`` group into one pluggy plugin
manager, then asks each plugin to register its schedules and backends. A
plugin that fails to import, fails to register, or registers something
invalid (a name already taken, where built-in backends register first, or
an object lacking a required attribute or method) is recorded with its distribution and the reason; it never stops the
other backends from working.

Environment controls:

* ``TOKENRING_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points at all; only
  plugins passed to `register_plugin` exist.
* ``TOKENRING_PLUGINS=cpu,myback``: load only the entry points with these names.
* ``TOKENRING_BACKEND=name``: the backend to use when a call names none and
  several available backends serve the tensors' device type.

Selection order: an explicit ``backend=`` argument wins; otherwise the
available backends whose ``device_type`` matches q's device are candidates;
``TOKENRING_BACKEND`` breaks a tie; two candidates and no preference is an
error that names both.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from tokenring import hookspecs, schedules
from tokenring.interfaces import Backend, BackendError, Probe
from tokenring.placement.layout import Layout
from tokenring.plan.model import Schedule

CORE_DISTRIBUTION = "tokenring-attn"
_REQUIRED_METHODS = ("probe", "create_comm", "create_kernel")
_REQUIRED_ATTRIBUTES = ("name", "device_type", "capabilities")


@dataclass
class BackendEntry:
    """One registered (or refused) backend, as ``tokenring backends`` shows it."""

    name: str
    distribution: str
    backend: Backend | None = None
    error: str | None = None          # why the plugin or registration failed
    _probe: Probe | None = field(default=None, repr=False)

    @property
    def probe(self) -> Probe:
        if self.error is not None:
            return Probe(False, self.error)
        if self._probe is None:
            assert self.backend is not None
            try:
                self._probe = self.backend.probe()
            except Exception as exc:  # a probe must not raise; report it as unavailable
                self._probe = Probe(False, f"probe raised {type(exc).__name__}: {exc}")
        return self._probe

    @property
    def available(self) -> bool:
        return self.probe.available

    def to_json(self) -> dict[str, Any]:
        probe = self.probe
        return {
            "name": self.name,
            "distribution": self.distribution,
            "available": probe.available,
            "reason": probe.reason,
            "details": dict(probe.details),
            "device_type": getattr(self.backend, "device_type", None),
            "capabilities": self.backend.capabilities.to_json() if self.backend is not None else None,
        }


@dataclass
class ScheduleEntry:
    """One registered (or refused) schedule, as ``tokenring plan --list`` shows it."""

    name: str
    distribution: str
    schedule: Schedule | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "summary": self.schedule.summary if self.schedule is not None else None,
            "layouts": [x.value for x in self.schedule.layouts] if self.schedule is not None else None,
            "error": self.error,
        }


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, BackendEntry] | None = None
        self._broken: list[BackendEntry] = []
        self._schedules: dict[str, ScheduleEntry] = {}
        self._broken_schedules: list[ScheduleEntry] = []
        self._extra_plugins: list[tuple[Any, str]] = []
        self.generation = 0  # grows whenever what is registered may change; caches key on it

    # -- discovery -------------------------------------------------------------

    def register_plugin(self, plugin: Any, distribution: str = "<registered in code>") -> None:
        """Add a plugin object or module by hand (for tests, notebooks, or autoload off)."""
        with self._lock:
            self._extra_plugins.append((plugin, distribution))
            self._entries = None
            self.generation += 1

    def reset(self) -> None:
        """Forget everything discovered; the next use rediscovers."""
        with self._lock:
            self._entries = None
            self.generation += 1

    def entries(self) -> list[BackendEntry]:
        """Every backend, valid or not, in discovery order."""
        self._ensure_loaded()
        assert self._entries is not None
        return list(self._entries.values()) + list(self._broken)

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._entries is None:
                found = _discover(self._extra_plugins)
                self._entries, self._broken, self._schedules, self._broken_schedules, self._hook = found

    @property
    def hook(self) -> pluggy.HookRelay:
        """The hooks of every loaded plugin, for hooks other than backend registration.

        For example ``registry.hook.tokenring_timeline`` (see `tokenring.hookspecs`).
        """
        self._ensure_loaded()
        return self._hook

    # -- schedules -------------------------------------------------------------

    def schedule_entries(self) -> list[ScheduleEntry]:
        """Every schedule, valid or not, first-party ones first."""
        self._ensure_loaded()
        return list(self._schedules.values()) + list(self._broken_schedules)

    def schedule_names(self) -> tuple[str, ...]:
        self._ensure_loaded()
        return tuple(self._schedules)

    def schedule(self, name: str) -> Schedule:
        """The named schedule; ValueError naming the registered ones otherwise."""
        self._ensure_loaded()
        entry = self._schedules.get(name) if isinstance(name, str) else None
        if entry is None:
            broken = [e for e in self._broken_schedules if e.name == name]
            if broken:
                raise ValueError(f"schedule {name!r} from {broken[0].distribution} is broken: {broken[0].error}")
            choices = ", ".join(repr(n) for n in self._schedules)
            raise ValueError(f"unknown algorithm {name!r}; expected one of {choices}")
        assert entry.schedule is not None
        return entry.schedule

    # -- selection -------------------------------------------------------------

    def get(self, name: str) -> Backend:
        """The named backend, ready to use; a clear BackendError otherwise."""
        self._ensure_loaded()
        assert self._entries is not None
        entry = self._entries.get(name)
        if entry is None:
            broken = [e for e in self._broken if e.name == name]
            if broken:
                raise BackendError(f"backend {name!r} from {broken[0].distribution} is broken: {broken[0].error}")
            raise BackendError(f"unknown backend {name!r}; available backends: {self._names_available()}")
        if not entry.available:
            raise BackendError(f"backend {name!r} ({entry.distribution}) is not available here: {entry.probe.reason}")
        assert entry.backend is not None
        return entry.backend

    def for_device(self, device_type: str) -> Backend:
        self._ensure_loaded()
        assert self._entries is not None
        candidates = [e for e in self._entries.values() if e.available and e.backend.device_type == device_type]
        preferred = os.environ.get("TOKENRING_BACKEND")
        if preferred:
            chosen = [e for e in candidates if e.name == preferred]
            if chosen:
                return chosen[0].backend  # type: ignore[return-value]
        if not candidates:
            raise BackendError(
                f"no available backend serves device type {device_type!r}; "
                f"available backends: {self._names_available()}"
            )
        if len(candidates) > 1:
            names = " and ".join(f"{e.name!r} ({e.distribution})" for e in candidates)
            raise BackendError(
                f"backends {names} both serve device type {device_type!r}; pass backend=... "
                "or set TOKENRING_BACKEND to choose one"
            )
        return candidates[0].backend  # type: ignore[return-value]

    def _names_available(self) -> str:
        assert self._entries is not None
        names = [e.name for e in self._entries.values() if e.available]
        return ", ".join(repr(n) for n in names) if names else "none"


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "<unknown distribution>"
    return f"{dist.metadata['Name']} {dist.version}"


def _selected_entry_points() -> list[importlib.metadata.EntryPoint]:
    if os.environ.get("TOKENRING_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0"):
        return []
    points = list(importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP))
    allowed = os.environ.get("TOKENRING_PLUGINS")
    if allowed is not None:
        names = {n.strip() for n in allowed.split(",") if n.strip()}
        points = [ep for ep in points if ep.name in names]
    # Two installed copies of one distribution would list the same entry point twice.
    unique: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
    for ep in points:
        unique.setdefault((ep.name, ep.value), ep)
    # Built-in backends register first, so a plugin cannot take their names.
    return sorted(unique.values(), key=lambda ep: _distribution_name(ep).split()[0] != CORE_DISTRIBUTION)


def _short_error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    suffix = f" (at {where.filename}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{suffix}"


def _first_party_schedules() -> list[tuple[str, Any, str]]:
    """Every module of `tokenring.schedules` that implements the schedule hook, by name."""
    found = []
    for info in sorted(pkgutil.iter_modules(schedules.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{schedules.__name__}.{info.name}")
        if hasattr(module, "tokenring_register_schedules"):
            found.append((module.__name__, module, CORE_DISTRIBUTION))
    return found


def _discover(
    extra_plugins: list[tuple[Any, str]],
) -> tuple[dict[str, BackendEntry], list[BackendEntry], dict[str, ScheduleEntry], list[ScheduleEntry], pluggy.HookRelay]:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    entries: dict[str, BackendEntry] = {}
    broken: list[BackendEntry] = []
    # First-party schedules register first, through the same hook, so a plugin cannot take their names.
    plugins: list[tuple[str, Any, str]] = _first_party_schedules()  # (plugin name, plugin, distribution)

    for ep in _selected_entry_points():
        distribution = _distribution_name(ep)
        try:
            plugins.append((ep.name, ep.load(), distribution))
        except BaseException as exc:  # a plugin's import error must not escape
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            broken.append(BackendEntry(ep.name, distribution, error=f"failed to import {ep.value!r}: {_short_error(exc)}"))
    for index, (plugin, distribution) in enumerate(extra_plugins):
        plugins.append((getattr(plugin, "__name__", f"plugin-{index}"), plugin, distribution))

    distribution_of: dict[str, str] = {}
    for plugin_name, plugin, distribution in plugins:
        try:
            registered_name = manager.register(plugin, name=f"{plugin_name}@{distribution}")
        except Exception as exc:
            broken.append(BackendEntry(plugin_name, distribution, error=f"invalid plugin: {_short_error(exc)}"))
            continue
        if registered_name is not None:
            distribution_of[registered_name] = distribution

    _collect(manager.hook.tokenring_register_backends, distribution_of, entries, broken, _validate_backend,
             lambda name, dist, obj=None, error=None: BackendEntry(name, dist, backend=obj, error=error))
    schedules: dict[str, ScheduleEntry] = {}
    broken_schedules: list[ScheduleEntry] = []
    _collect(manager.hook.tokenring_register_schedules, distribution_of, schedules, broken_schedules,
             _validate_schedule, lambda name, dist, obj=None, error=None: ScheduleEntry(name, dist, schedule=obj, error=error))
    return entries, broken, schedules, broken_schedules, manager.hook


def _collect(hook: Any, distribution_of: dict[str, str], entries: dict, broken: list,
             validate: Callable[[Any], str | None], make_entry: Callable[..., Any]) -> None:
    """Call every implementation of a registration hook, in registration order (first-party first).

    Each registered object is validated; a refused one, a name already taken,
    or a registration that raises is recorded in ``broken`` with the plugin's
    distribution and the reason, and never stops the other registrations.
    """
    for impl in hook.get_hookimpls():
        distribution = distribution_of.get(impl.plugin_name, "<unknown distribution>")

        def register(obj: Any, distribution: str = distribution) -> None:
            name = getattr(obj, "name", None)
            label = name if isinstance(name, str) and name else repr(obj)
            problem = validate(obj)
            if problem is None and name in entries:
                problem = f"name {name!r} is already registered by {entries[name].distribution}"
            if problem is not None:
                broken.append(make_entry(label, distribution, error=problem))
            else:
                entries[name] = make_entry(name, distribution, obj)

        try:
            impl.function(register=register)
        except Exception as exc:
            broken.append(make_entry(impl.plugin_name.split("@")[0], distribution,
                                     error=f"registration raised {_short_error(exc)}"))


def _validate_schedule(schedule: Any) -> str | None:
    name = getattr(schedule, "name", None)
    if not isinstance(schedule, Schedule):
        return f"expected a tokenring.Schedule, got {type(schedule).__name__}"
    if not (isinstance(name, str) and name and name.strip() == name and "," not in name):
        return f"schedule name must be a non-empty string without commas or outer spaces, got {name!r}"
    if not callable(schedule.build):
        return f"schedule {name!r}: build is not callable"
    if not schedule.layouts or not all(isinstance(x, Layout) for x in schedule.layouts):
        return f"schedule {name!r}: layouts must be a non-empty tuple of tokenring.Layout"
    return None


def _validate_backend(backend: Any) -> str | None:
    missing = [a for a in _REQUIRED_ATTRIBUTES if not getattr(backend, a, None)]
    missing += [m for m in _REQUIRED_METHODS if not callable(getattr(backend, m, None))]
    if missing:
        return f"backend object {backend!r} lacks required {', '.join(missing)}"
    if not isinstance(backend.name, str):
        return f"backend name must be a string, got {backend.name!r}"
    for method in _REQUIRED_METHODS:
        if getattr(type(backend), method, None) is getattr(Backend, method, None) and isinstance(backend, Backend):
            return f"backend {backend.name!r} does not implement {method}()"
    return None


registry = Registry()

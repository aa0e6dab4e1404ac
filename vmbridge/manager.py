"""The registry of VMs and the io.vmbridge.Manager service.

The manager owns every Machine of the daemon and, while a VM runs, the
varlink server of its control socket (``<runtime-dir>/machines/NAME/control``).
VMs are transient (created by a client, forgotten when they exit, as
machined does) or persistent (a definition file in the configuration
directory keeps them listed across exits and daemon restarts).

It also owns the stats sampler (vmbridge/machine/stats.py), the one greenlet
that samples every running VM's resource figures; ``List`` and ``Stats``
answer from its last round.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import time

import gevent
import gevent.pool
import greenlet
import psutil

from vmbridge import __version__
from vmbridge.control import PRODUCT, URL, VENDOR, build_service
from vmbridge.machine import (ConfigError, EventHub, Machine, MachineConfig, MachineError,
                              MachineEvent, MachineState, SetupError)
from vmbridge.machine.definitions import Definitions
from vmbridge.machine.stats import StatsSampler, pss_bytes
from vmbridge.varlink import Server, Service, VarlinkError, interface_text

log = logging.getLogger("vmbridge.manager")

INTERFACE = "io.vmbridge.Manager"
MANAGER_SOCKET = INTERFACE


class Entry:
    """A VM in the registry, with its control socket's server while it runs."""

    def __init__(self, machine: Machine, persistent: bool):
        self.machine = machine
        self.persistent = persistent
        self.server: Server | None = None


class Manager:
    def __init__(self, runtime_dir: str, config_dir: str | None, *, command_timeout: float = 30.0,
                 allowed_uids=None, on_change=None, console_log_size: int | None = None,
                 stats_interval: float = 2.0, max_connections_per_uid=None):
        self.runtime_dir = runtime_dir
        self.machines_dir = os.path.join(runtime_dir, "machines")
        self.definitions = Definitions(config_dir) if config_dir else None
        self.command_timeout = command_timeout
        self.console_log_size = console_log_size
        self.allowed_uids = allowed_uids
        self.max_connections_per_uid = max_connections_per_uid  # None: the varlink server's default
        self.entries: dict[str, Entry] = {}
        self.lifecycle = EventHub()
        self._on_change = on_change  # the daemon's status line
        # Resource figures: sampled from load() on, unless stats_interval is 0.
        self.sampler = StatsSampler(self._sampled_machines, stats_interval) if stats_interval > 0 else None
        self.server: Server | None = None  # the manager socket's server, set by the daemon (connection count)
        self._greenlets: tuple[float, int] | None = None  # (monotonic, count), see daemon_figures
        os.makedirs(self.machines_dir, mode=0o700, exist_ok=True)

    # ---------------------------------------------------------------- queries

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise VarlinkError(f"{INTERFACE}.NoSuchMachine", {"name": name})
        return entry

    def count(self, *states: MachineState) -> int:
        return sum(1 for e in self.entries.values() if e.machine.state in states)

    def info(self, entry: Entry, *, figures: str | None = None) -> dict:
        """The VM as a Machine object; `figures` "summary" (List) or "full" (Stats) adds its figures."""
        m = entry.machine
        out = {"name": m.name, "class": "vm", "state": m.state.value,
               "sinceUSec": int(m.since * 1_000_000), "persistent": entry.persistent,
               "autostart": m.config.autostart, "config": m.config.to_dict()}
        if m.state.active and m.qemu_status != "unknown":
            out["status"] = m.qemu_status
        if entry.server is not None:
            out["controlAddress"] = entry.server.address
        if m.pid is not None:
            out["pid"] = m.pid
        if m.qemu_version:
            out["qemuVersion"] = m.qemu_version
        if m.error:
            out["error"] = m.error
        if m.shutdown_reason:
            out["shutdownReason"] = m.shutdown_reason
        if m.exit_info is not None:
            out.update(m.exit_info.to_dict())
        if figures and self.sampler is not None:
            values = self.sampler.figures(m, full=figures == "full")
            if values is not None:
                out["figures"] = values
        return out

    def _sampled_machines(self):
        return [e.machine for e in self.entries.values()]

    def _count_greenlets(self) -> int:
        now = time.monotonic()
        if self._greenlets is None or now - self._greenlets[0] >= 1.0:
            # filter() with the type's C-level check: no Python frame per object.
            alive = filter(greenlet.greenlet.__instancecheck__, gc.get_objects())
            self._greenlets = (now, sum(1 for g in alive if not g.dead))
        return self._greenlets[1]

    def daemon_figures(self) -> dict:
        """vmbridged's own footprint (io.vmbridge.Manager's DaemonFigures).

        Read when asked: a handful of /proc/self reads, and a walk over the
        garbage collector's objects to count greenlets (gevent keeps no
        registry of them): ~40k objects with 50 VMs, 5-10 ms of CPU, which is
        why the count is kept for a second however often Stats is asked.
        """
        me = psutil.Process()
        with me.oneshot():
            times = me.cpu_times()
            out = {"pid": me.pid, "version": __version__,
                   "uptimeUSec": int(max(time.time() - me.create_time(), 0) * 1_000_000),
                   "cpuUSec": int((times.user + times.system) * 1_000_000),
                   "rssBytes": me.memory_info().rss, "threads": me.num_threads(), "fds": me.num_fds()}
        if self.sampler is not None and self.sampler.self_cpu_percent is not None:
            out["cpuPercent"] = self.sampler.self_cpu_percent
        pss = pss_bytes(me.pid)
        if pss is not None:
            out["pssBytes"] = pss
        out["fdLimit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        out["greenlets"] = self._count_greenlets()
        out["managerConnections"] = self.server.connections if self.server is not None else 0
        out["machineConnections"] = sum(e.server.connections for e in self.entries.values() if e.server is not None)
        out["machines"] = len(self.entries)
        out["activeMachines"] = self.count(MachineState.STARTING, MachineState.RUNNING, MachineState.PAUSED,
                                           MachineState.SHUTTING_DOWN)
        out["statsIntervalUSec"] = int(self.sampler.interval * 1_000_000) if self.sampler is not None else 0
        if self.sampler is not None and self.sampler.last_round is not None:
            out["statsRoundUSec"] = int(self.sampler.last_round * 1_000_000)
        return out

    # -------------------------------------------------------------- lifecycle

    def _new_machine(self, config: MachineConfig) -> Machine:
        return Machine(config, os.path.join(self.machines_dir, config.name),
                       command_timeout=self.command_timeout, on_change=self._machine_changed,
                       console_log_size=self.console_log_size)

    def load(self) -> None:
        """At daemon start: adopt the VMs an earlier vmbridged left, then the definitions."""
        definitions = self.definitions.load_all() if self.definitions else {}
        self._adopt_leftovers(definitions)
        for name, config in definitions.items():
            if name not in self.entries:
                self.entries[name] = Entry(self._new_machine(config), persistent=True)
        autostart = [e for e in self.entries.values()
                     if e.persistent and e.machine.config.autostart and not e.machine.state.active]
        for entry in autostart:
            gevent.spawn(self._autostart, entry)
        if self.sampler is not None:
            self.sampler.start()

    def _autostart(self, entry: Entry) -> None:
        try:
            entry.machine.start()
        except MachineError as e:
            log.error("%s: autostart failed: %s", entry.machine.name, e)

    def _adopt_leftovers(self, definitions: dict) -> None:
        try:
            names = sorted(os.listdir(self.machines_dir))
        except FileNotFoundError:
            return
        leftovers = [n for n in names if os.path.exists(os.path.join(self.machines_dir, n, "state.json"))]
        jobs = {name: gevent.spawn(self._try_adopt, name) for name in leftovers}
        gevent.joinall(list(jobs.values()))
        for name, job in jobs.items():
            machine, error = job.value
            if machine is None:
                log.warning("%s: not adopted (%s); it exited while vmbridged was away", name, error)
                shutil.rmtree(os.path.join(self.machines_dir, name), ignore_errors=True)
                continue
            entry = Entry(machine, persistent=name in definitions)
            self.entries[name] = entry
            log.info("%s: adopted running QEMU (pid %s, %s)", name, machine.pid, machine.qemu_status)
            self._open_control(entry)
            self._publish("added", entry)

    def _try_adopt(self, name: str):
        try:
            return Machine.adopt(os.path.join(self.machines_dir, name), command_timeout=self.command_timeout,
                                 on_change=self._machine_changed,
                                 console_log_size=self.console_log_size), None
        except Exception as e:  # whatever went wrong, that VM is not ours any more
            return None, e

    def create(self, config: MachineConfig, persistent: bool = False) -> Entry:
        old = self.entries.get(config.name)
        if old is not None and (old.persistent or old.machine.state.active):
            raise VarlinkError(f"{INTERFACE}.MachineExists", {"name": config.name})
        if persistent and self.definitions is None:
            raise VarlinkError(f"{INTERFACE}.InvalidConfig",
                               {"field": "persistent", "message": "vmbridged runs without a configuration directory"})
        entry = Entry(self._new_machine(config), persistent)
        self.entries[config.name] = entry  # reserve the name before anything blocks
        if persistent:
            self.definitions.save(config)
        self._publish("added", entry)
        self._start(entry)
        return entry

    def define(self, config: MachineConfig) -> Entry:
        if self.definitions is None:
            raise VarlinkError(f"{INTERFACE}.InvalidConfig",
                               {"field": "persistent", "message": "vmbridged runs without a configuration directory"})
        old = self.entries.get(config.name)
        if old is not None and old.machine.state.active:
            raise VarlinkError(f"{INTERFACE}.MachineActive", {"name": config.name, "state": old.machine.state.value})
        self.definitions.save(config)
        entry = Entry(self._new_machine(config), persistent=True)
        self.entries[config.name] = entry
        self._publish("added", entry)
        return entry

    def start(self, name: str) -> Entry:
        entry = self.get(name)
        if entry.machine.state.active:
            if entry.machine.state == MachineState.STARTING:
                entry.machine.wait_settled()
            return entry
        self._start(entry)
        return entry

    def _start(self, entry: Entry) -> None:
        machine = entry.machine
        try:
            machine.start()
        except SetupError as e:
            if not entry.persistent:
                self._forget(entry)
            raise VarlinkError(f"{INTERFACE}.SetupFailed",
                               {"name": machine.name, "message": e.message,
                                **({"device": e.device} if e.device else {})}) from e

    def terminate(self, name: str) -> None:
        self.get(name).machine.terminate()

    def remove(self, name: str, force: bool = False) -> None:
        entry = self.get(name)
        machine = entry.machine
        if machine.state.active:
            if not force:
                raise VarlinkError(f"{INTERFACE}.MachineActive", {"name": name, "state": machine.state.value})
            machine.terminate()
        if entry.persistent and self.definitions is not None:
            self.definitions.delete(name)
        self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        name = entry.machine.name
        if self.entries.get(name) is entry:
            del self.entries[name]
            shutil.rmtree(entry.machine.directory, ignore_errors=True)
            self._publish("removed", entry)

    def _machine_changed(self, machine: Machine, old: MachineState, new: MachineState) -> None:
        entry = self.entries.get(machine.name)
        if entry is None or entry.machine is not machine:
            return
        if new == MachineState.RUNNING and entry.server is None:
            self._open_control(entry)
        elif new in (MachineState.EXITED, MachineState.FAILED):
            self._close_control(entry)
        self._publish(new.value, entry)
        if new == MachineState.EXITED and not entry.persistent:
            self._forget(entry)
        if self._on_change is not None:
            self._on_change()

    def _open_control(self, entry: Entry) -> None:
        path = os.path.join(entry.machine.directory, "control")
        # fd passing: AddStorage/ReplaceStorage receive the image's fd with the call.
        server = Server(build_service(entry.machine), path=path, mode=0o600,
                        allowed_uids=self.allowed_uids, allow_fd_passing=True,
                        max_connections_per_uid=self.max_connections_per_uid)
        server.start()
        entry.server = server

    def _close_control(self, entry: Entry):
        """Remove the socket; calls in progress get their answer and streams drain.

        In a greenlet of its own: the caller may be what a call in progress waits for.
        """
        server, entry.server = entry.server, None
        if server is not None:
            return gevent.spawn(server.stop, graceful=True)
        return None

    def _publish(self, event: str, entry: Entry) -> None:
        if len(self.lifecycle):
            self.lifecycle.publish(MachineEvent(event, {"name": entry.machine.name, "info": self.info(entry)}))

    def shutdown(self, *, keep_vms: bool = False) -> None:
        """Daemon exit: terminate every VM (in parallel), or leave them running for adoption."""
        if self.sampler is not None:
            self.sampler.stop()
        entries = list(self.entries.values())
        if keep_vms:
            for entry in entries:
                entry.machine.detach()
        else:
            group = gevent.pool.Group()
            for entry in entries:
                if entry.machine.state.active:
                    group.spawn(entry.machine.terminate)
            group.join()
        gevent.joinall([g for g in map(self._close_control, entries) if g is not None])
        self.lifecycle.close()


class ManagerService:
    """io.vmbridge.Manager's methods."""

    def __init__(self, manager: Manager):
        self.manager = manager

    @staticmethod
    def _config(params: dict) -> MachineConfig:
        try:
            return MachineConfig.from_dict(params)
        except ConfigError as e:
            raise VarlinkError(f"{INTERFACE}.InvalidConfig", {"field": e.field, "message": e.message}) from e

    def List(self, call):
        name = call.parameters.get("name")
        entries = [self.manager.get(name)] if name is not None else \
            sorted(self.manager.entries.values(), key=lambda e: e.machine.name)
        return {"machines": [self.manager.info(e, figures="summary") for e in entries]}

    def Stats(self, call):
        name = call.parameters.get("name")
        if name is None:
            return {"daemon": self.manager.daemon_figures()}
        return {"machine": self.manager.info(self.manager.get(name), figures="full")}

    def Create(self, call):
        entry = self.manager.create(self._config(call.parameters["config"]),
                                    bool(call.parameters.get("persistent")))
        return {"machine": self.manager.info(entry)}

    def Define(self, call):
        return {"machine": self.manager.info(self.manager.define(self._config(call.parameters["config"])))}

    def Start(self, call):
        return {"machine": self.manager.info(self.manager.start(call.parameters["name"]))}

    def Terminate(self, call):
        self.manager.terminate(call.parameters["name"])
        return {}

    def Remove(self, call):
        self.manager.remove(call.parameters["name"], bool(call.parameters.get("force")))
        return {}

    def SubscribeEvents(self, call):
        name = call.parameters.get("name")
        if name is not None:
            self.manager.get(name)
        subscription = self.manager.lifecycle.subscribe(on_drop=call.connection.close)
        return self._stream(subscription, name)

    @staticmethod
    def _stream(subscription, name):
        with subscription:
            yield {"event": "READY"}
            for event in subscription:
                if name is None or event.data["name"] == name:
                    yield {"event": event.name, "machine": event.data["info"]}


def build_manager_service(manager: Manager) -> Service:
    service = Service(vendor=VENDOR, product=PRODUCT, version=__version__, url=URL)
    service.add_interface(interface_text(INTERFACE), ManagerService(manager))
    return service

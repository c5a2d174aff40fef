"""Following a run's stream on the driver: its events reported as they happen, and the record kept of what they say."""

from __future__ import annotations

import signal

import ray

from .events import AgentFinished, AgentStarted, Event, EventHandler, Notice, SubPlanReady
from .hub import AgentDone, NodeLost, PlanComplete, RunChannel, StopRequested, StreamItem
from .interrupts import StopSignal
from .paths import AgentPath
from .record import AgentRecord, RunRecord, SubRunRecord
from .run_directory import RunFiles


class NoNodeLeft(Exception):
    """The follower's way out: the last node holding the run's LLM slots was lost."""


class EventFollower:
    """Reports the hub's events as they happen and keeps the record of what they say.

    Before the plan is complete there is no record: agents' starts are reported at once, and what
    needs the record (results, sub-plans, warnings) waits for it. What changes in the record goes to the
    run's files (`RunFiles`), which decide when to write it; the follower waits no longer than they say.
    """

    def __init__(self, channel: RunChannel, on_event: EventHandler) -> None:
        self.channel, self.on_event = channel, on_event
        self.announced: dict[AgentPath, int] = {}  # agent path -> the latest execution whose start was reported
        self.early: list[StreamItem] = []  # events that wait for the record
        self.next_events = channel.next_batch()

    def _batch(self, timeout: float | None) -> list[StreamItem] | None:
        ready, _ = ray.wait([self.next_events], timeout=timeout)
        if not ready:
            return None
        events = ray.get(self.next_events)
        self.next_events = self.channel.next_batch()
        return events

    def until_planned(self) -> None:
        """Report starts and tokens until the coordinator's thread says the plan is complete."""
        while True:
            batch = self._batch(None) or []
            for position, event in enumerate(batch):
                _stop_if_asked(event)
                if isinstance(event, PlanComplete):
                    self.early.extend(batch[position + 1 :])  # for `until_done`, in order
                    return
                if isinstance(event, (AgentDone, SubPlanReady, NodeLost)) or (isinstance(event, Notice) and event.warning):
                    self.early.append(event)
                else:
                    self._report(event)

    def until_done(self, record: RunRecord, run_dir: RunFiles) -> None:
        """Follow until every agent of the plan has its result (a round's: those of earlier rounds have theirs)."""
        waiting = {agent.path for agent in record.agents if not agent.reused and agent.status in ("pending", "delegated")}
        events, self.early = self.early, []
        while True:
            for event in events:
                self._record(event, record, run_dir, waiting)
            if not waiting:
                return
            batch = self._batch(run_dir.checkpoint_due_in())
            if batch is None:
                run_dir.checkpoint()
                events = []
            else:
                events = batch

    def _record(
        self,
        event: StreamItem,
        record: RunRecord,
        run_dir: RunFiles,
        waiting: set[AgentPath],
    ) -> None:
        _stop_if_asked(event)
        if isinstance(event, SubPlanReady):
            parent = _agent_at(record, event.path)
            if parent.sub_run is None:  # a resumed sub-plan keeps what it had
                parent.sub_run = SubRunRecord.start(event.path, event.query, event.plan)
            run_dir.record_changed()
        elif isinstance(event, AgentDone):
            agents, index = record.find(event.path)
            agent = agents[index] = event.result
            if agent.path not in self.announced and agent.started_at is not None:
                self._report(AgentStarted(path=agent.path, role=agent.role, attempt=1, pid=0))
            waiting.discard(event.path)
            run_dir.agent_finished(agent)
            self.on_event(AgentFinished(agent=agent))
            return
        elif isinstance(event, NodeLost):
            record.warnings.append(event.describe())
            run_dir.record_changed()
            if not event.nodes_left:
                raise NoNodeLeft(event.describe())
            event = Notice(event.describe(), warning=True)
        elif isinstance(event, Notice) and event.warning and event.text not in record.warnings:
            record.warnings.append(event.text)
        if not isinstance(event, PlanComplete):
            self._report(event)

    def _report(self, event: Event) -> None:
        """Pass an event on; an agent's start only once per execution."""
        if isinstance(event, AgentStarted):
            if event.attempt <= self.announced.get(event.path, 0):
                return
            self.announced[event.path] = event.attempt
        self.on_event(event)


def _stop_if_asked(event: StreamItem) -> None:
    """A stop asked through the stream (`RunStop`) ends the run where Ctrl-C would, on the same path."""
    if isinstance(event, StopRequested):
        raise StopSignal(signal.SIGINT)


def _agent_at(record: RunRecord, path: AgentPath) -> AgentRecord:
    agents, index = record.find(path)
    return agents[index]

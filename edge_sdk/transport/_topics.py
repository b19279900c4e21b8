"""Topic names of the MQTT protocol (see DESIGN.md, "MQTT protocol").

Every name has at most 7 slashes and no wildcard in a published topic, so the
same layout works on Mosquitto, EMQX, HiveMQ and AWS IoT Core. Chunk requests
travel on a per-device topic so that the broker's ACL, not the payload, says who
asks: a responder answers only on the response topic of the device named by the
request topic (see :class:`~edge_sdk.transport.RepoResponder`)::

    {prefix}/{fleet}/repo/announce            retained: current TUF timestamp version
    {prefix}/{fleet}/dev/{device}/repo/req    chunk requests (device -> responders)
    {prefix}/{fleet}/dev/{device}/repo/res    chunk responses (responder -> device)
    {prefix}/{fleet}/dev/{device}/desired     retained: signed deployment for a device
    {prefix}/{fleet}/grp/{group}/desired      retained: signed deployment for a group
    {prefix}/{fleet}/dev/{device}/state       retained: device state report
    {prefix}/{fleet}/dev/{device}/events      device events
    {prefix}/{fleet}/dev/{device}/profile/req signed profiling requests (host -> device)
    {prefix}/{fleet}/dev/{device}/profile/res profiling results (device -> host)
    {prefix}/{fleet}/dev/{device}/samples/req retained: signed sample request (host -> device)
    {prefix}/{fleet}/dev/{device}/samples/res retained: sample status (device -> host)
    {prefix}/{fleet}/dev/{device}/samples/get chunk requests for a bundle (host -> device)
    {prefix}/{fleet}/dev/{device}/samples/put chunk answers (device -> host)
    {prefix}/{fleet}/enrol/{batch}/{device}/req enrolment request (claim account -> controller)
    {prefix}/{fleet}/enrol/{batch}/{device}/res retained: enrolment answer (controller -> claim)
    {prefix}/{fleet}/dev/{device}/cred/req    signed renewal request / ack (device -> controller)
    {prefix}/{fleet}/dev/{device}/cred/res    sealed renewal answer (controller -> device)
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import _TOPIC_WORD as _DEVICE
from ._config import MqttConfig, check_topic_word

RESPONDER_SHARE_GROUP = "edge-repo"


@dataclass(frozen=True)
class Topics:
    """Builds the topic names of one fleet. Device and group ids must be one topic level."""

    fleet: str
    prefix: str = "edge"

    def __post_init__(self) -> None:
        check_topic_word(self.fleet, "fleet")
        check_topic_word(self.prefix, "topic prefix")

    @classmethod
    def for_config(cls, config: MqttConfig) -> Topics:
        return cls(config.fleet, config.topic_prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    @property
    def announce(self) -> str:
        return f"{self.base}/repo/announce"

    def repo_request(self, device: str) -> str:
        """Where ``device`` publishes its chunk requests (the ACL lets only it write there)."""
        return f"{self.device(device)}/repo/req"

    @property
    def every_repo_request(self) -> str:
        """Subscription filter for the chunk requests of every device."""
        return f"{self.base}/dev/+/repo/req"

    def shared_repo_request(self, group: str = RESPONDER_SHARE_GROUP) -> str:
        """Shared-subscription filter so that several responders split the requests."""
        return f"$share/{check_topic_word(group, 'share group')}/{self.every_repo_request}"

    def share_probe(self, token: str) -> str:
        """A topic nobody else uses, to find out whether the broker honours ``$share``."""
        return f"{self.base}/probe/{check_topic_word(token, 'probe token')}"

    def requester(self, topic: str) -> str | None:
        """The device id of a chunk request topic, or None if ``topic`` is not one."""
        head, tail = f"{self.base}/dev/", "/repo/req"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        device = topic[len(head):-len(tail)]
        return device if _DEVICE.match(device) else None

    def repo_response(self, device: str) -> str:
        return f"{self.device(device)}/repo/res"

    def device(self, device: str) -> str:
        return f"{self.base}/dev/{check_topic_word(device, 'device id')}"

    def desired(self, device: str) -> str:
        return f"{self.device(device)}/desired"

    def group_desired(self, group: str) -> str:
        return f"{self.base}/grp/{check_topic_word(group, 'group')}/desired"

    def state(self, device: str) -> str:
        return f"{self.device(device)}/state"

    def events(self, device: str) -> str:
        return f"{self.device(device)}/events"

    def every_device(self, leaf: str) -> str:
        """Subscription filter for one leaf (``state``, ``events``) of every device."""
        return f"{self.base}/dev/+/{check_topic_word(leaf, 'topic leaf')}"

    # -- on-device profiling (appended; see edge_sdk.profiling) ---------

    def profile_request(self, device: str) -> str:
        """Signed profiling requests for ``device`` (host -> device, not retained)."""
        return f"{self.device(device)}/profile/req"

    def profile_result(self, device: str) -> str:
        """``device``'s profiling results and refusals (device -> host)."""
        return f"{self.device(device)}/profile/res"

    # -- field samples (appended; see edge_sdk.samples) -------------------

    def samples_request(self, device: str) -> str:
        """Signed sample requests for ``device`` (host -> device, retained)."""
        return f"{self.device(device)}/samples/req"

    def samples_status(self, device: str) -> str:
        """``device``'s word on its sample requests (device -> host, retained)."""
        return f"{self.device(device)}/samples/res"

    def samples_get(self, device: str) -> str:
        """Chunk requests for ``device``'s sample bundles (host -> device)."""
        return f"{self.device(device)}/samples/get"

    def samples_put(self, device: str) -> str:
        """The chunks of ``device``'s sample bundles (device -> host)."""
        return f"{self.device(device)}/samples/put"

    # -- device identity (appended; see edge_sdk.identity) ---------------

    def _enrol(self, batch: str, device: str) -> str:
        return (f"{self.base}/enrol/{check_topic_word(batch, 'claim batch')}/"
                f"{check_topic_word(device, 'device id')}")

    def enrol_request(self, batch: str, device: str) -> str:
        """Where a device, through the claim account of ``batch``, asks to be enrolled."""
        return f"{self._enrol(batch, device)}/req"

    def enrol_answer(self, batch: str, device: str) -> str:
        """The controller's retained answer to ``device``'s enrolment request."""
        return f"{self._enrol(batch, device)}/res"

    @property
    def every_enrol_request(self) -> str:
        """Subscription filter for the enrolment requests of every claim batch."""
        return f"{self.base}/enrol/+/+/req"

    def enrol_batch_requests(self, batch: str) -> str:
        """Subscription filter for the enrolment requests of one claim batch."""
        return f"{self.base}/enrol/{check_topic_word(batch, 'claim batch')}/+/req"

    def enrol_requester(self, topic: str) -> tuple[str, str] | None:
        """``(batch, device)`` of an enrolment request topic, or None if ``topic`` is not one."""
        head, tail = f"{self.base}/enrol/", "/req"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        words = topic[len(head):-len(tail)].split("/")
        if len(words) != 2 or not all(_DEVICE.fullmatch(w) for w in words):
            return None
        return words[0], words[1]

    def cred_request(self, device: str) -> str:
        """Where ``device`` sends signed renewal requests and acks (device -> controller)."""
        return f"{self.device(device)}/cred/req"

    def cred_answer(self, device: str) -> str:
        """Where the controller sends ``device`` its sealed renewed credentials."""
        return f"{self.device(device)}/cred/res"

    @property
    def every_cred_request(self) -> str:
        """Subscription filter for the renewal requests of every device."""
        return f"{self.base}/dev/+/cred/req"

    def cred_requester(self, topic: str) -> str | None:
        """The device id of a renewal request topic, or None if ``topic`` is not one."""
        head, tail = f"{self.base}/dev/", "/cred/req"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        device = topic[len(head):-len(tail)]
        return device if _DEVICE.fullmatch(device) else None

"""The manifest of a bundle: :class:`Manifest`, its JSON form (``to_dict``, ``from_dict``) and the named
consistency checks every manifest passes on reading and before writing.

Reading checks every key against the format (type, range, cross-references such as "every member of a stack
exists") and names the bad key's path in the error, e.g. ``manifest.json: stacks[2].sha256: expected a hex sha256
digest (64 characters), got 3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgens.ensemble import FAMILIES
from edgens.errors import BundleError, unknown_choice
from edgens.checks import shown
from edgens.runtime.bundle.json_reader import JsonReader, plain
from edgens.runtime.bundle.parse import (parse_calibration, parse_curves, parse_input, parse_member, parse_metrics,
                                         parse_outliers, parse_preprocessing, parse_self_test, parse_specialist,
                                         parse_stack, parse_training)
from edgens.runtime.bundle.types import (CURVE_KEYS, FORMAT, FORMAT_VERSION, KNOWN_KEYS, MANIFEST_FILE,
                                         OPTIONAL_KEYS, ORDER_METHODS, SUPPORTED_VERSIONS, CalibrationInfo, Curves,
                                         InputSpec, MemberInfo, Metrics, OutlierInfo, Preprocessing, SelfTestInfo,
                                         SpecialistInfo, StackInfo, TrainingInfo, utc_now)


@dataclass(kw_only=True)
class Manifest:
    """Everything ``manifest.json`` says about a bundle (format version 2).

    Build one with keyword arguments and write it with :func:`write_manifest`, which checks it first. ``format``
    and ``format_version`` are not fields: this class always writes the current format.

    Attributes:
        family: ``categorical``, ``gaussian`` or ``poisson``.
        n_outputs: K, the classes for categorical, 1 otherwise.
        input: the stack graphs' input.
        preprocessing: normalisation the runtime applies to raw input.
        members: one entry per member.
        order: the anytime order, every member id once.
        stacks: general stacks first (in order), then prefix stacks (smallest first), then specialist stacks.
        edgens_version: version of edgens that wrote the bundle.
        training: how the ensemble was trained.
        curves: validation curves over the number of members.
        metrics: full-ensemble validation and test metrics.
        class_names: K names (categorical) or None.
        order_method: ``greedy``, ``index``, ``trained`` (index order of a run trained for its prefixes) or
            ``trained-greedy`` (those prefixes kept, greedy order inside each).
        specialists: specialist sub-ensembles (may be empty).
        calibration: raw validation examples in the bundle, or None.
        outliers: thresholds of silent-fault detection, or None (bundles written before it; then no detection).
        self_test: stored expected outputs for the self-test, or None.
        created: ISO-8601 UTC time of export (default: now).
        extra: top-level keys this version does not know, kept as they are so that rewriting a manifest (e.g.
            adding engines on the device) does not drop what a newer writer put there.
    """

    family: str
    n_outputs: int
    input: InputSpec
    preprocessing: Preprocessing
    members: list[MemberInfo]
    order: list[int]
    stacks: list[StackInfo]
    edgens_version: str
    training: TrainingInfo
    curves: Curves
    metrics: Metrics
    class_names: list[str] | None = None
    order_method: str = "greedy"
    specialists: list[SpecialistInfo] = field(default_factory=list)
    calibration: CalibrationInfo | None = None
    outliers: OutlierInfo | None = None
    self_test: SelfTestInfo | None = None
    created: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def general_stacks(self) -> list[StackInfo]:
        """The general stacks, in anytime order."""
        return [stack for stack in self.stacks if stack.role == "general"]

    @property
    def prefix_stacks(self) -> list[StackInfo]:
        """The prefix stacks, smallest first: each holds the members of the first few general stacks."""
        return [stack for stack in self.stacks if stack.role == "prefix"]

    def stack(self, name: str) -> StackInfo:
        """The stack called ``name``.

        Raises:
            ConfigError: no stack has that name (the message lists them).
        """
        for stack in self.stacks:
            if stack.name == name:
                return stack
        raise unknown_choice("stack", name, [stack.name for stack in self.stacks])

    def member(self, member_id: int) -> MemberInfo:
        """The member with id ``member_id`` (KeyError if none)."""
        for member in self.members:
            if member.id == member_id:
                return member
        raise KeyError(f"member {member_id} is not in the manifest")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds (numpy scalars and arrays become plain Python values).

        Raises:
            BundleError: ``extra`` holds a key that is a field of this class.
        """
        clash = sorted(set(self.extra) & KNOWN_KEYS)
        if clash:
            raise BundleError(f"Manifest.extra holds {', '.join(map(repr, clash))}, which the format defines; set "
                              f"the Manifest field instead (e.g. Manifest.calibration = CalibrationInfo(...))")
        optional = {key: getattr(self, key).to_dict() for key in sorted(OPTIONAL_KEYS)
                    if getattr(self, key) is not None}
        return plain({
            **self.extra,
            "format": FORMAT, "format_version": FORMAT_VERSION, "edgens_version": self.edgens_version,
            "created": self.created, "family": self.family, "n_outputs": self.n_outputs,
            "class_names": None if self.class_names is None else list(self.class_names),
            "input": self.input.to_dict(), "preprocessing": self.preprocessing.to_dict(),
            "training": self.training.to_dict(), "members": [member.to_dict() for member in self.members],
            "order": list(self.order), "order_method": self.order_method,
            "stacks": [stack.to_dict() for stack in self.stacks],
            "specialists": [specialist.to_dict() for specialist in self.specialists],
            "curves": self.curves.to_dict(), "metrics": self.metrics.to_dict(), **optional,
        })

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILE) -> Manifest:
        """Parse and check a manifest's JSON object.

        Args:
            data: the parsed JSON.
            source: how errors name the manifest (the file's path when read from disk).

        Raises:
            BundleError: a key is missing, has the wrong type or range, refers to something that does not exist,
                or the format version is not one this reader knows. The message names the key's path.
        """
        return _parse_manifest(JsonReader(source), data)


def _parse_manifest(r: JsonReader, data: Any) -> Manifest:
    data = r.obj(data, "(top level)")
    if data.get("format") != FORMAT:
        raise r.fail("format", f"{FORMAT!r} (is this an edgens bundle?)", data.get("format", "nothing"))
    version = r.get(data, "format_version", "", "an integer")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:  # type(): neither True nor 1.0 is a version
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        newer = type(version) is int and version > max(SUPPORTED_VERSIONS)
        hint = "; the bundle is newer than this edgens: upgrade edgens on the device" if newer else ""
        writer = data.get("edgens_version")
        by = f" (written by edgens {writer})" if isinstance(writer, str) else ""
        raise r.error("format_version", f"this edgens reads bundle format version(s) {supported}, got "
                                        f"{shown(version)}{by}{hint}")
    family = r.str_(data, "family", "", FAMILIES)
    n_outputs = r.int_(data, "n_outputs", "", minimum=1)
    class_names = r.get(data, "class_names", "", "a list of strings or null")
    if class_names is not None:
        if (not isinstance(class_names, list) or len(class_names) != n_outputs
                or not all(isinstance(name, str) for name in class_names)):
            raise r.fail("class_names", f"null or a list of {n_outputs} strings (n_outputs)", class_names)
        class_names = list(class_names)
    manifest = Manifest(
        family=family,
        n_outputs=n_outputs,
        class_names=class_names,
        edgens_version=r.str_(data, "edgens_version", ""),
        created=r.str_(data, "created", ""),
        input=parse_input(r, r.obj(r.get(data, "input", "", "an object"), "input")),
        preprocessing=parse_preprocessing(r, r.obj(r.get(data, "preprocessing", "", "an object"), "preprocessing")),
        training=parse_training(r, r.obj(r.get(data, "training", "", "an object"), "training")),
        members=[parse_member(r, r.obj(item, f"members[{i}]"), f"members[{i}]")
                 for i, item in enumerate(r.list_(data, "members", "", "a list of member objects"))],
        order=r.ints(data, "order", ""),
        order_method=r.str_(data, "order_method", "", ORDER_METHODS),
        stacks=[parse_stack(r, r.obj(item, f"stacks[{i}]"), f"stacks[{i}]", version)
                for i, item in enumerate(r.list_(data, "stacks", "", "a list of stack objects"))],
        specialists=[parse_specialist(r, r.obj(item, f"specialists[{i}]"), f"specialists[{i}]")
                     for i, item in enumerate(r.list_(data, "specialists", "", "a list of specialist objects"))],
        curves=parse_curves(r, r.obj(r.get(data, "curves", "", "an object"), "curves")),
        metrics=parse_metrics(r, r.obj(r.get(data, "metrics", "", "an object"), "metrics")),
        calibration=parse_calibration(r, data.get("calibration")),
        outliers=parse_outliers(r, data.get("outliers")),
        self_test=parse_self_test(r, data.get("self_test")),
        extra={key: value for key, value in data.items() if key not in KNOWN_KEYS},
    )
    for check in CONSISTENCY_CHECKS:
        check(r, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Consistency: cross-references between keys, which a per-key type check cannot see. One named check per rule, run in
# this order (CONSISTENCY_CHECKS); each raises BundleError naming the key.


def check_channels(r: JsonReader, m: Manifest) -> None:
    """The preprocessing has one mean and one std per input channel."""
    channels = m.input.shape[0]
    for key in ("mean", "std"):
        values = getattr(m.preprocessing, key)
        if len(values) != channels:
            raise r.fail(f"preprocessing.{key}", f"{channels} values, one per channel (input.shape[0])", values)


def check_members(r: JsonReader, m: Manifest) -> None:
    """Member ids are unique and ``order`` holds each exactly once."""
    ids = [member.id for member in m.members]
    if not ids:
        raise r.fail("members", "at least one member", [])
    seen: set[int] = set()
    for i, member_id in enumerate(ids):
        if member_id in seen:
            raise r.error(f"members[{i}].id", f"member id {member_id} appears twice; ids must be unique")
        seen.add(member_id)
    if sorted(m.order) != sorted(ids):
        raise r.fail("order", f"every member id exactly once ({len(ids)} ids: {sorted(ids)[:8]}...)", m.order)


def check_stacks(r: JsonReader, m: Manifest) -> None:
    """Stack names are unique; each stack holds distinct known members and their flops; general stacks come first,
    then prefix stacks (smallest first), then specialist stacks; the general stacks cut ``order`` in order."""
    ids = {member.id for member in m.members}
    flops = {member.id: member.flops for member in m.members}
    names: dict[str, int] = {}
    general: list[int] = []
    previous_prefix = 0
    for i, stack in enumerate(m.stacks):
        path = f"stacks[{i}]"
        if stack.name in names:
            raise r.error(f"{path}.name", f"{stack.name!r} is also the name of stacks[{names[stack.name]}]; names "
                                          f"must be unique")
        names[stack.name] = i
        for j, member_id in enumerate(stack.members):
            if member_id not in ids:
                raise r.error(f"{path}.members[{j}]", f"member id {member_id} is not in members")
        if len(set(stack.members)) != len(stack.members):
            raise r.fail(f"{path}.members", "distinct member ids", stack.members)
        expected = sum(flops[member_id] for member_id in stack.members)
        if stack.flops != expected:
            raise r.fail(f"{path}.flops", f"{expected}, the sum of its members' flops", stack.flops)
        if stack.role == "general":
            if any(s.role != "general" for s in m.stacks[:i]):
                raise r.error(f"{path}.role", "general stacks must come before prefix and specialist stacks")
            general.extend(stack.members)
        elif stack.role == "prefix":
            if any(s.role == "specialist" for s in m.stacks[:i]):
                raise r.error(f"{path}.role", "prefix stacks must come before specialist stacks")
            if len(stack.members) <= previous_prefix:
                raise r.error(f"{path}.members", "prefix stacks must be listed smallest first, each larger than the "
                                                 "one before")
            previous_prefix = len(stack.members)
    if general != m.order:
        raise r.error("stacks", f"the general stacks' members, in order, must be exactly `order` (consecutive "
                                f"chunks); got {general[:12]}, order is {m.order[:12]}")


def check_prefixes(r: JsonReader, m: Manifest) -> None:
    """Each prefix stack holds exactly the members of the first general stacks, in order."""
    boundaries: set[int] = set()  # member counts at which a general stack ends
    count = 0
    for stack in m.general_stacks:
        count += len(stack.members)
        boundaries.add(count)
    for i, stack in enumerate(m.stacks):
        n = len(stack.members)
        if stack.role == "prefix" and (stack.members != m.order[:n] or n not in boundaries):
            raise r.error(f"stacks[{i}].members", f"a prefix stack must hold exactly the members of the first "
                                                  f"general stacks, in order (order[:n] with n one of "
                                                  f"{sorted(boundaries)}); got {len(stack.members)} members "
                                                  f"starting {stack.members[:6]}")


def check_specialists(r: JsonReader, m: Manifest) -> None:
    """Tasks are unique, name a class, and each names a specialist stack holding exactly its members."""
    names = {stack.name: i for i, stack in enumerate(m.stacks)}
    tasks: set[str] = set()
    for i, specialist in enumerate(m.specialists):
        path = f"specialists[{i}]"
        if specialist.task in tasks:
            raise r.error(f"{path}.task", f"task {specialist.task!r} appears twice; tasks must be unique")
        tasks.add(specialist.task)
        if specialist.class_index >= m.n_outputs:
            raise r.fail(f"{path}.class_index", f"a class index below n_outputs ({m.n_outputs})",
                         specialist.class_index)
        if specialist.stack not in names:
            raise r.fail(f"{path}.stack", f"the name of a stack ({', '.join(sorted(names))})", specialist.stack)
        stack = m.stacks[names[specialist.stack]]
        if stack.role != "specialist" or sorted(stack.members) != sorted(specialist.members):
            raise r.error(f"{path}.stack", f"stack {stack.name!r} must be a specialist stack holding exactly the "
                                           f"members {specialist.members}; it is a {stack.role} stack holding "
                                           f"{stack.members}")


def check_outlier_thresholds(r: JsonReader, m: Manifest) -> None:
    """Silent-fault detection has one threshold per general stack."""
    if m.outliers is not None:
        general_names = [stack.name for stack in m.general_stacks]
        if sorted(m.outliers.thresholds) != sorted(general_names):
            raise r.fail("outliers.thresholds", f"one threshold per general stack ({', '.join(general_names)})",
                         sorted(m.outliers.thresholds))


def check_curves(r: JsonReader, m: Manifest) -> None:
    """Each validation curve has one value per k = 1..M."""
    for key in CURVE_KEYS:
        values = getattr(m.curves, key)
        if len(values) != len(m.members):
            raise r.fail(f"curves.{key}", f"a list of {len(m.members)} numbers (one per k = 1..M)", values)


CONSISTENCY_CHECKS = (check_channels, check_members, check_stacks, check_prefixes, check_specialists,
                      check_outlier_thresholds, check_curves)

"""The rack example: a port of Go Fabrica's example 04 (rack reconciliation).

A RackTemplate describes hardware (chassis x blades x nodes, shared or
dedicated BMCs); a Rack names a template by ``templateUID`` (a uid or a
name) and its reconciler builds the tree of Chassis, Blade, Node and BMC
objects with owner references and deterministic names, so a retry after a
crash or a partial failure never duplicates anything. It scales up and down
when the template or the rack changes, re-converges when the template
appears later (``watches``), aggregates the children's Ready conditions, and
deleting the rack deletes every child (garbage collection).

    python fabrica.py serve examples/rack_reconciliation.py
    python fabrica.py racktemplate create --spec '{"name": "standard", "chassisCount": 2,
        "chassisConfig": {"bladeCount": 4, "bladeConfig": {"nodeCount": 2, "bmcMode": "shared"}}}'
    python fabrica.py rack create --spec '{"name": "rack-01", "templateUID": "standard"}'
    python fabrica.py rack get rack-01
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import fabrica

RACK_LABEL = "example.fabrica.io/rack"


@dataclass
class BladeConfig:
    nodeCount: int = field(default=2, metadata={"minimum": 1, "maximum": 8})
    bmcMode: Literal["shared", "dedicated"] = "shared"


@dataclass
class ChassisConfig:
    bladeCount: int = field(default=4, metadata={"minimum": 1, "maximum": 16})
    bladeConfig: BladeConfig = field(default_factory=BladeConfig)


@dataclass
class RackTemplateSpec:
    chassisCount: int = field(metadata={"minimum": 1, "maximum": 42})
    chassisConfig: ChassisConfig = field(default_factory=ChassisConfig)
    description: str = ""


@dataclass
class RackSpec:
    templateUID: str
    location: str = ""
    datacenter: str = ""
    row: str = ""
    position: int = 0


@dataclass
class RackStatus:
    phase: Literal["Pending", "Provisioning", "Ready", "Error"] = "Pending"
    chassisUIDs: list[str] = field(default_factory=list)
    totalChassis: int = 0
    totalBlades: int = 0
    totalNodes: int = 0
    totalBMCs: int = 0


app = fabrica.Fabrica(data_dir="./data")


def racks_using(template):
    """Racks whose templateUID names this template (by uid or by name): re-queued when it changes."""
    refs = {template.uid, template.name}
    return [rack.uid for rack in app.client.list("Rack") if rack.spec.get("templateUID") in refs]


def rack_of(child):
    """The rack a Blade, Node or BMC belongs to (their owner is not the rack itself)."""
    rack = child.labels.get(RACK_LABEL)
    return [rack] if rack else []


app.register("RackTemplate", spec=RackTemplateSpec, prefix="rktmpl")


def desired_tree(rack, template) -> dict[str, list[tuple[str, str | None, dict]]]:
    """Every child the rack should have: kind -> [(name, parent name, spec)], parents first."""
    cc = template.spec["chassisConfig"]
    bc = cc["bladeConfig"]
    tree = {"Chassis": [], "Blade": [], "BMC": [], "Node": []}
    for c in range(template.spec["chassisCount"]):
        chassis = f"{rack.name}-c{c}"
        tree["Chassis"].append((chassis, None, {"rackUID": rack.uid, "chassisNumber": c}))
        for b in range(cc["bladeCount"]):
            blade = f"{chassis}-b{b}"
            tree["Blade"].append((blade, chassis, {"chassisName": chassis, "bladeNumber": b}))
            if bc["bmcMode"] == "shared":
                tree["BMC"].append((f"{blade}-bmc", blade, {"bladeName": blade, "mode": "shared"}))
            for n in range(bc["nodeCount"]):
                node = f"{blade}-n{n}"
                bmc = f"{node}-bmc" if bc["bmcMode"] == "dedicated" else f"{blade}-bmc"
                tree["Node"].append((node, blade, {"bladeName": blade, "bmcName": bmc, "nodeNumber": n}))
                if bc["bmcMode"] == "dedicated":
                    tree["BMC"].append((bmc, node, {"nodeName": node, "mode": "dedicated"}))
    return tree


OWNER_KIND = {"Chassis": "Rack", "Blade": "Chassis", "BMC": None, "Node": "Blade"}


@app.register("Rack", spec=RackSpec, status=RackStatus, prefix="rack", owns=["Chassis"],
              watches={"RackTemplate": racks_using, "Blade": rack_of, "Node": rack_of, "BMC": rack_of})
def reconcile_rack(ctx, rack):
    client = ctx.client
    try:
        template = client.get("RackTemplate", rack.spec["templateUID"])
    except fabrica.NotFoundError:
        rack.status["phase"] = "Error"
        rack.set_condition("Ready", False, reason="TemplateNotFound",
                           message=f"RackTemplate {rack.spec['templateUID']!r} does not exist")
        return None     # `watches` re-queues the rack when the template appears
    tree = desired_tree(rack, template)
    created = 0
    for kind in ("Chassis", "Blade", "Node", "BMC"):    # parents before children
        existing = {c.name: c for c in client.list(kind, selector=f"{RACK_LABEL}={rack.uid}")}
        wanted = {name: (parent, spec) for name, parent, spec in tree[kind]}
        for name, child in existing.items():            # scale down: the subtree goes with it
            if name not in wanted:
                try:
                    client.delete(kind, child.uid)
                except fabrica.NotFoundError:
                    pass
        for name, (parent, spec) in wanted.items():     # scale up, idempotently (deterministic names)
            if name in existing:
                continue
            if kind == "BMC":
                owner = client.get("Node" if spec["mode"] == "dedicated" else "Blade", parent)
            else:
                owner = rack if parent is None else client.get(OWNER_KIND[kind], parent)
            client.create(kind, name=name, spec=spec, labels={RACK_LABEL: rack.uid}, owner=owner)
            created += 1
    counts = {kind: len(items) for kind, items in tree.items()}
    chassis = client.list("Chassis", selector=f"{RACK_LABEL}={rack.uid}")
    rack.status.update({
        "chassisUIDs": [c.uid for c in sorted(chassis, key=lambda c: c.spec["chassisNumber"])],
        "totalChassis": counts["Chassis"], "totalBlades": counts["Blade"],
        "totalNodes": counts["Node"], "totalBMCs": counts["BMC"],
    })
    not_ready = sum(1 for kind in tree for child in client.list(kind, selector=f"{RACK_LABEL}={rack.uid}")
                    if (child.condition("Ready") or {}).get("status") != "True")
    summary = (f"{counts['Chassis']} chassis, {counts['Blade']} blades, {counts['Node']} nodes, "
               f"{counts['BMC']} BMCs")
    if created or not_ready:
        rack.status["phase"] = "Provisioning"
        rack.set_condition("Ready", False, reason="Provisioning",
                           message=f"{not_ready or created} of {sum(counts.values())} children not ready ({summary})")
        return None     # the children's status changes re-queue the rack (owns/watches)
    rack.status["phase"] = "Ready"
    rack.set_condition("Ready", True, reason="Provisioned", message=summary)
    return None


def reconcile_hardware(ctx, obj):
    """Chassis, blades, nodes and BMCs: a stand-in for discovering real hardware."""
    defaults = {"Chassis": {"powerState": "On", "health": "OK"},
                "Blade": {"powerState": "On", "health": "OK"},
                "Node": {"powerState": "On", "bootState": "Ready", "health": "OK"},
                "BMC": {"reachable": True, "health": "OK"}}[obj.kind]
    obj.status.update(defaults)
    obj.set_condition("Ready", True, reason="Discovered")


app.register("Chassis", reconcile_hardware, prefix="chas", workers=2)
app.register("Blade", reconcile_hardware, prefix="blade", workers=2)
app.register("Node", reconcile_hardware, prefix="node", workers=2)
app.register("BMC", reconcile_hardware, prefix="bmc", workers=2)


if __name__ == "__main__":
    app.serve(port=8080)

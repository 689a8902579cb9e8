"""The write path (Registry) used directly, without HTTP; the REST layer's parsing; the leader-election seam.

Classes follow fabrica.py's section order. Every wait polls a condition with
a timeout. Stdlib + pytest only.
"""

from __future__ import annotations

import threading
import time

import pytest

import fabrica


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.005):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        pause.wait(interval)


###############################################################################
# Leader election
###############################################################################

class TestLeaderElector:
    def test_the_base_elector_leads_from_start_to_stop(self):
        seen = []
        elector = fabrica.LeaderElector("me")
        assert not elector.is_leader() and elector.leader is None
        elector.start(lambda: seen.append(("started", elector.is_leader())), lambda: seen.append(("stopped",)))
        assert seen == [("started", True)] and elector.is_leader() and elector.leader == "me"
        elector._started_leading()              # no second start for one transition
        assert seen == [("started", True)]
        elector.stop()
        assert seen == [("started", True), ("stopped",)] and not elector.is_leader() and elector.leader is None
        elector._started_leading()              # after stop() no callback runs
        elector._stopped_leading()
        assert len(seen) == 2 and not elector.is_leader()

    def test_a_store_gives_an_always_leader_elector(self):
        elector = fabrica.MemoryStore().leader_elector("host-1")
        assert type(elector) is fabrica.LeaderElector and elector.identity == "host-1"


###############################################################################
# Registry
###############################################################################

SIZED = {"type": "object", "properties": {"size": {"type": "integer", "default": 1}}}


@pytest.fixture
def registry():
    """A started Registry over an open MemoryStore: Rack (a spec schema), Shelf, Bin (finalize=), Note (history)."""
    reg = fabrica.Registry()
    reg.store = store = fabrica.MemoryStore()
    reg.declare("Rack", spec=SIZED)
    reg.declare("Shelf")
    reg.declare("Bin", finalize=lambda ctx, obj: None)
    reg.declare("Note", history=True)
    store.open({info.kind: info.plural for info in reg.kinds.values()})
    reg.start()
    yield reg
    reg.stop()
    store.close()


def kind(reg, name):
    return reg.resolve_kind(name)


class TestRegistry:
    def test_a_write_before_start_is_a_configuration_error(self):
        reg = fabrica.Registry()
        rack = reg.declare("Rack")
        with pytest.raises(fabrica.ConfigurationError, match="not started"):
            reg.create(rack, name="r1")

    def test_declare_refuses_what_register_refuses(self, registry):
        with pytest.raises(fabrica.ConfigurationError, match="already registered"):
            registry.declare("Rack")
        with pytest.raises(fabrica.ConfigurationError, match="unknown option"):
            registry.declare("Crate", colour="red")
        assert registry.served("racks") is kind(registry, "RACKS") is registry.kinds["Rack"]
        assert registry.served("crates") is None
        assert [k["kind"] for k in registry.discovery()["kinds"]] == ["Rack", "Shelf", "Bin", "Note"]

    def test_create_sets_server_managed_fields_and_spec_defaults(self, registry):
        obj = registry.create(kind(registry, "Rack"), name="r1", labels={"zone": "a"})
        meta = obj["metadata"]
        assert obj["spec"] == {"size": 1} and obj["status"] == {}
        assert meta["name"] == "r1" and meta["uid"].startswith("rack-") and meta["generation"] == 1
        assert meta["labels"] == {"zone": "a"} and meta["finalizers"] == [] and meta["ownerReferences"] == []
        assert registry.get(kind(registry, "Rack"), "r1") is registry.store.get("Rack", meta["uid"])
        with pytest.raises(fabrica.NotFoundError):
            registry.get(kind(registry, "Rack"), "r2")

    def test_every_invalid_field_is_listed_at_once(self, registry):
        with pytest.raises(fabrica.ValidationError) as caught:
            registry.create(kind(registry, "Rack"), name="Not_A_Name", labels={"zone": 7}, finalizers=[""],
                            spec={"size": "big"}, resource_version=7)
        fields = [d["field"] for d in caught.value.details]
        assert fields == ["metadata.name", "metadata.labels.zone", "metadata.finalizers",
                          "metadata.resourceVersion", "spec.size"], fields
        with pytest.raises(fabrica.BadRequestError, match="spec must be a JSON object"):
            registry.create(kind(registry, "Rack"), name="r1", spec=["not", "a", "dict"])
        assert registry.store.count("Rack") == 0

    def test_generation_moves_exactly_when_the_spec_changes(self, registry):
        rack = kind(registry, "Rack")
        registry.create(rack, name="r1", spec={"size": 2}, labels={"a": "1"})
        obj = registry.update(rack, "r1", labels={"b": "2"}, merge_metadata=True)
        assert obj["metadata"]["labels"] == {"a": "1", "b": "2"} and obj["metadata"]["generation"] == 1
        obj = registry.update(rack, "r1", labels={"c": "3"})
        assert obj["metadata"]["labels"] == {"c": "3"} and obj["metadata"]["generation"] == 1
        same = registry.update(rack, "r1", spec={"size": 2})
        assert same is obj          # nothing changed: nothing written, the stored object back
        obj = registry.update(rack, "r1", spec={"size": 3})
        assert obj["spec"] == {"size": 3} and obj["metadata"]["generation"] == 2
        obj = registry.update_status(rack, "r1", {"phase": "Up"})
        assert obj["status"] == {"phase": "Up"} and obj["metadata"]["generation"] == 2
        with pytest.raises(fabrica.ValidationError, match="immutable"):
            registry.update(rack, "r1", name="r2")

    def test_a_stale_resource_version_is_409_an_unmet_if_match_412(self, registry):
        rack = kind(registry, "Rack")
        rv = registry.create(rack, name="r1")["metadata"]["resourceVersion"]
        with pytest.raises(fabrica.ConflictError) as caught:
            registry.update(rack, "r1", spec={"size": 5}, resource_version="999")
        assert type(caught.value) is fabrica.ConflictError and "resourceVersion" in str(caught.value)
        for if_match in (("999",), ()):     # () is an If-Match of weak tags only: it never matches
            with pytest.raises(fabrica.PreconditionFailedError, match="If-Match"):
                registry.patch(kind(registry, "Rack"), "r1", {"size": 5}, if_match=if_match)
        with pytest.raises(fabrica.PreconditionFailedError, match="If-None-Match"):
            registry.update(rack, "r1", spec={"size": 5}, if_none_match=("*",))
        with pytest.raises(fabrica.PreconditionFailedError):
            registry.delete(rack, "r1", if_match=("999",))
        assert registry.get(rack, "r1")["metadata"]["resourceVersion"] == rv
        obj = registry.update(rack, "r1", spec={"size": 5}, if_match=("1", rv), resource_version=rv)
        obj = registry.patch(rack, "r1", {"size": 6}, if_match=("*",), if_none_match=("1",))
        assert obj["spec"] == {"size": 6}
        assert registry.delete(rack, "r1", if_match=(obj["metadata"]["resourceVersion"],))[1] is True

    def test_patches_of_the_spec_and_the_status(self, registry):
        rack = kind(registry, "Rack")
        registry.create(rack, name="r1")
        assert registry.patch(rack, "r1", [{"op": "add", "path": "/rows", "value": 4}], "json")["spec"] == \
            {"size": 1, "rows": 4}
        assert registry.patch(rack, "r1", {"rows": 5}, "shorthand")["spec"]["rows"] == 5
        with pytest.raises(fabrica.ValidationError, match="not a spec field"):
            registry.patch(rack, "r1", {"labels": {"a": "b"}})
        with pytest.raises(fabrica.UnsupportedMediaTypeError):
            registry.patch(rack, "r1", {}, "xml")
        obj = registry.patch(rack, "r1", {"phase": "Up"}, status=True)
        assert obj["status"] == {"phase": "Up"} and obj["metadata"]["generation"] == 3
        with pytest.raises(fabrica.ValidationError, match="conditions"):
            registry.check_status(rack, {"conditions": "ready"}, obj["status"])

    def test_owners_and_the_cascade(self, registry):
        rack, shelf = kind(registry, "Rack"), kind(registry, "Shelf")
        owner = registry.create(rack, name="r1")
        ref = {"kind": "Rack", "uid": owner["metadata"]["uid"], "controller": True}
        dependent = registry.create(shelf, name="s1", owner_references=[ref])
        assert dependent["metadata"]["ownerReferences"] == [{**ref, "name": "r1"}]
        with pytest.raises(fabrica.ValidationError, match="ownerReferences"):
            registry.create(shelf, name="s2", owner_references=[{"kind": "Rack"}])
        registry.delete(rack, "r1")
        assert registry.store.find("Shelf", "s1") is None        # collected in the caller's thread
        with pytest.raises(fabrica.ConflictError, match="does not exist"):
            registry.create(shelf, name="s3", owner_references=[ref])

    def test_finalizers_hold_a_delete_until_they_are_removed(self, registry):
        bin_ = kind(registry, "Bin")
        obj = registry.create(bin_, name="b1")
        assert obj["metadata"]["finalizers"] == [fabrica.FINALIZER]
        marked, gone = registry.delete(bin_, "b1")
        assert not gone and marked["metadata"]["deletionTimestamp"]
        assert registry.delete(bin_, "b1") == (marked, False)      # a second DELETE changes nothing
        with pytest.raises(fabrica.ValidationError, match="being deleted"):
            registry.update(bin_, "b1", finalizers=[fabrica.FINALIZER, "example.com/x"])
        last = registry.mutate(bin_, "b1", lambda new: new["metadata"].__setitem__("finalizers", []))
        assert last["metadata"]["finalizers"] == [] and registry.store.find("Bin", "b1") is None

    def test_history_and_restore(self, registry):
        note = kind(registry, "Note")
        registry.create(note, name="n1", spec={"text": "one"})
        obj = registry.update(note, "n1", spec={"text": "two"})
        assert obj["status"]["version"] == "2"
        assert [v["versionId"] for v in registry.store.versions("Note", obj["metadata"]["uid"])] == ["1", "2"]
        obj = registry.restore(note, "n1", "1")
        assert obj["spec"] == {"text": "one"} and obj["status"]["version"] == "3"
        with pytest.raises(fabrica.NotFoundError, match="no version"):
            registry.restore(note, "n1", "9")

    def test_the_open_server_declares_a_kind_only_once_an_object_of_it_is_stored(self, registry):
        registry.open = True
        with pytest.raises(RuntimeError):
            with registry.open_kind("widgets") as info:
                assert info.kind == "Widget" and registry.served("widgets") is None
                raise RuntimeError("the create failed")
        assert registry.served("widgets") is None and "Widget" not in registry.kinds
        with registry.open_kind("gizmos", "Gadget") as info:
            registry.create(info, name="g1")
        assert registry.served("gizmos").kind == "Gadget"
        with pytest.raises(fabrica.ValidationError, match="cannot create kind"):
            with registry.open_kind("things", "lower"):
                pass


###############################################################################
# REST API
###############################################################################

class TestRestParsing:
    def test_etag_versions_names_resource_versions(self):
        assert fabrica.etag_versions(None) is None
        assert fabrica.etag_versions('"7"') == ("7",)
        assert fabrica.etag_versions('W/"7", "8", *') == ("8", "*")
        assert fabrica.etag_versions('7, W/"7", "') == ()

    def test_parse_body_gives_the_registry_arguments(self):
        reg = fabrica.Registry()
        rack = reg.declare("Rack")
        flat = fabrica.parse_body(rack, {"name": "r1", "labels": {"a": "b"}, "size": 2}, update=True)
        assert flat == {"name": "r1", "labels": {"a": "b"}, "annotations": None, "finalizers": None,
                        "spec": {"size": 2}, "resource_version": None, "merge_metadata": True}
        ref = {"kind": "Shelf", "uid": "shelf-1"}
        envelope = fabrica.parse_body(rack, {"metadata": {"name": "r1", "resourceVersion": "4",
                                                          "ownerReferences": [ref]}, "spec": {}})
        assert envelope["owner_references"] == [ref] and envelope["resource_version"] == "4"
        assert "merge_metadata" not in envelope
        for body, problem in (({"size": 1, "status": {}}, "status"), ({"kind": "Shelf"}, "kind"),
                              ({"spec": {}, "extra": 1}, "unknown top-level")):
            with pytest.raises(fabrica.ValidationError, match=problem):
                fabrica.parse_body(rack, body)


###############################################################################
# Fabrica
###############################################################################

class FakeElector(fabrica.LeaderElector):
    """Leads only when a test says so (gain/lose), as a lease-based elector would when it wins or loses."""

    def start(self, on_started_leading, on_stopped_leading):
        self._callbacks = (on_started_leading, on_stopped_leading)

    def gain(self):
        self._started_leading()

    def lose(self, holder="someone-else"):
        self._stopped_leading(holder)


class ElectedStore(fabrica.MemoryStore):
    def __init__(self):
        super().__init__()
        self.elector = None

    def leader_elector(self, identity):
        self.elector = FakeElector(identity)
        return self.elector


class TestLeadership:
    def test_a_single_process_store_always_leads(self):
        app = fabrica.Fabrica(store=fabrica.MemoryStore())
        app.register("Rack", lambda ctx, obj: None)
        assert app.health()["leader"] is False and app.health()["holderIdentity"] is None
        with app:
            health = app.health()
            assert health["leader"] is True and health["holderIdentity"] == app.identity
            assert list(app.controllers) == ["Rack"]
            assert f'fabrica_leader{{identity="{app.identity}"}} 1' in app.metrics_text().splitlines()
        assert app.controllers == {} and not app.elector.is_leader()

    def test_controllers_run_only_while_this_process_leads(self):
        store = ElectedStore()
        app = fabrica.Fabrica(store=store)
        seen, held, stopping = [], threading.Event(), []

        def reconcile(ctx, obj):
            seen.append(obj.name)
            if obj.name == "slow":
                held.set()
                stopping.append(ctx.stopping.wait(10))
        app.register("Rack", reconcile)
        with app:
            app.client.create("Rack", "r1")
            assert app.wait_idle(5) and seen == [] and app.controllers == {}
            assert app.health()["leader"] is False
            assert f'fabrica_leader{{identity="{app.identity}"}} 0' in app.metrics_text().splitlines()

            store.elector.gain()                # the start-up list finds what was written meanwhile
            assert wait_until(lambda: seen == ["r1"]) and list(app.controllers) == ["Rack"]
            assert app.health()["leader"] is True and app.health()["holderIdentity"] == app.identity
            app.client.create("Rack", "slow")
            assert held.wait(5)
            workers = list(app.controllers["Rack"]._threads)

            store.elector.lose("replica-b")     # the controllers stop before lose() returns
            assert stopping == [True] and app.controllers == {}
            assert workers and not any(t.is_alive() for t in workers)
            assert app.health()["leader"] is False and app.health()["holderIdentity"] == "replica-b"
            app.client.create("Rack", "r3")
            assert app.wait_idle(5) and "r3" not in seen

            store.elector.gain()
            assert wait_until(lambda: "r3" in seen)
        assert app.controllers == {}

    def test_the_garbage_collector_sweeps_only_while_leading(self):
        store = ElectedStore()
        app = fabrica.Fabrica(store=store)
        app.register("Rack")
        app.register("Shelf")
        with app:
            # as a crash mid-cascade leaves it: an object whose owner is gone
            store.create(fabrica.new_object("Shelf", "s1", "shelf-0000000a", owner_references=[
                {"kind": "Rack", "uid": "rack-0000000b", "name": "gone", "controller": True}]))
            assert app.wait_idle(5) and store.find("Shelf", "s1") is not None
            store.elector.gain()                # the start-up sweep runs now
            assert store.find("Shelf", "s1") is None


###############################################################################
# The file
###############################################################################

def _upward_references(source: str) -> list[str]:
    """Where a section of ``source`` uses what a later section defines, as ``line: [section] name (later)``.

    Counted: a module-level name (outside annotations, which are strings
    here), and a method or property of a later section's class used on a
    receiver known to be one: ``app``/``self.app``/``self._app`` (a
    Fabrica), a parameter annotated with the class, or ``self.x`` that
    ``__init__`` sets from such a parameter.
    """
    import ast
    import re
    lines = source.splitlines()
    banners = [(i + 1, m.group(1).strip()) for i, line in enumerate(lines)
               if (m := re.match(r"^# (.*?)#{4,}$", line))]

    def section(lineno):
        return max((k for k, (ln, _) in enumerate(banners) if ln <= lineno), default=-1)
    tree = ast.parse(source)
    defined, methods, class_sec = {}, {}, {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        for name in names:
            defined.setdefault(name, section(node.lineno))
        if isinstance(node, ast.ClassDef):
            class_sec[node.name] = section(node.lineno)
            methods[node.name] = {b.name for b in node.body if isinstance(b, ast.FunctionDef)}
    receivers = {"app": "Fabrica", "self.app": "Fabrica", "self._app": "Fabrica"}
    found = set()

    def annotated(args):
        out = {}
        for a in args.args + args.kwonlyargs:
            if a.annotation is not None:
                cls = ast.unparse(a.annotation).split("|")[0].strip().strip("'\"")
                if cls in class_sec:
                    out[a.arg] = cls
        return out

    def check(node, sec, typed, local):
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in local:
                later = defined.get(sub.id, -1)
                if later > sec:
                    found.add(f"{sub.lineno}: [{banners[sec][1]}] {sub.id} ({banners[later][1]})")
            elif isinstance(sub, ast.Attribute):
                cls = typed.get(ast.unparse(sub.value)) or receivers.get(ast.unparse(sub.value))
                if cls in class_sec and class_sec[cls] > sec and sub.attr in methods[cls]:
                    found.add(f"{sub.lineno}: [{banners[sec][1]}] {ast.unparse(sub)} ({banners[class_sec[cls]][1]})")

    def visit(node, sec, typed, local):
        if isinstance(node, ast.FunctionDef):
            inner = set(local) | {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            for sub in (s for stmt in node.body for s in ast.walk(stmt)):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    inner.add(sub.id)
                elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    inner.add(sub.name)
                elif isinstance(sub, ast.alias):
                    inner.add((sub.asname or sub.name).split(".")[0])
                elif isinstance(sub, ast.ExceptHandler) and sub.name:
                    inner.add(sub.name)
            for expr in node.args.defaults + [d for d in node.args.kw_defaults if d] + node.decorator_list:
                check(expr, sec, typed, local)
            typed = {**typed, **annotated(node.args)}
            for stmt in node.body:
                visit(stmt, sec, typed, inner)
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                check(base, sec, typed, local)
            typed = dict(typed)
            for init in (b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "__init__"):
                params = annotated(init.args)
                for sub in ast.walk(init):
                    if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Name) and sub.value.id in params:
                        typed.update({ast.unparse(t): params[sub.value.id] for t in sub.targets
                                      if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"})
            for stmt in node.body:
                visit(stmt, sec, typed, local)
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None:
                check(node.value, sec, typed, local)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit(child, sec, typed, local)
                else:
                    check(child, sec, typed, local)
    for node in tree.body:
        if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):    # runs last
            visit(node, section(node.lineno), {}, frozenset())
    return sorted(found, key=lambda text: int(text.split(":")[0]))


class TestFileLayout:
    def test_no_section_uses_what_a_later_section_defines(self):
        with open(fabrica.__file__, encoding="utf-8") as f:
            assert _upward_references(f.read()) == []

    def test_the_check_sees_a_call_up_the_file(self):
        source = '''
###
# First ####
###
def first(app: Second):
    app.method()
    return later_name

###
# Second ####
###
class Second:
    def method(self):
        pass

later_name = 1
'''
        found = _upward_references(source)
        assert [text.split(": ", 1)[1] for text in found] == \
            ["[First] app.method (Second)", "[First] later_name (Second)"], found

//! The OpenAPI 3.1 document of the API, served at `/api/v1/openapi.json`.
//!
//! Hand-maintained next to the routes: a unit test checks that it describes exactly the
//! methods and paths of [`super::router::ROUTES`], and the end-to-end test calls every path it
//! lists against a running gateway. Field names of the bodies are those of the read models
//! (`crate::replication::status`) and requests (`crate::replication::actions`).

use axum::Json;
use serde_json::{json, Value};

fn err_responses(extra: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(
        "401".into(),
        json!({"description": "no token, or not a current one", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
    );
    for (code, why) in extra {
        m.insert(
            (*code).into(),
            json!({"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(m)
}

fn op(summary: &str, ok: &str, errors: &[(&str, &str)]) -> Value {
    let mut r = err_responses(errors);
    if let Value::Object(m) = &mut r {
        m.insert("200".into(), json!({"description": ok}));
    }
    json!({"summary": summary, "responses": r})
}

fn action(summary: &str, ok_code: &str, ok: &str, body: Option<Value>) -> Value {
    let mut r = err_responses(&[
        ("400", "invalid request (nothing changed)"),
        ("403", "read-only token"),
        ("404", "no such VM"),
        (
            "409",
            "the current state does not allow it (nothing changed)",
        ),
    ]);
    if let Value::Object(m) = &mut r {
        m.insert(ok_code.into(), json!({"description": ok}));
    }
    let mut o = json!({"summary": summary, "responses": r});
    if let (Some(b), Value::Object(m)) = (body, &mut o) {
        m.insert(
            "requestBody".into(),
            json!({"required": false, "content": {"application/json": {"schema": b}}}),
        );
    }
    o
}

/// The test failover: `action` plus its `500 launch_failed`.
fn test_failover() -> Value {
    let mut o = action("Test failover: overlays and exports for every disk at one point (replication untouched), then the policy's failover_command launched unless `launch` is false. Answers 202 once every disk is served and the VM ran for 2 s, with the job (finished), `exports`, `uris`, `served_secs`, `launch` (not_requested, no_command, launched) and `vm_process` (pid, state, exit, log)", "202", "served, VM launched", Some(json!({"$ref": "#/components/schemas/FailoverRequest"})));
    if let Some(r) = o.get_mut("responses").and_then(Value::as_object_mut) {
        r.insert(
            "500".into(),
            json!({"description": "launch_failed: the failover command could not be executed or exited non-zero within 2 s; the job failed with this message, the exports stay served", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    o
}

fn path_param(name: &str, what: &str, ty: &str) -> Value {
    json!([{"name": name, "in": "path", "required": true, "description": what, "schema": {"type": ty}}])
}

fn with_params(mut o: Value, params: Value) -> Value {
    if let Value::Object(m) = &mut o {
        m.insert("parameters".into(), params);
    }
    o
}

/// The document.
pub fn spec() -> Value {
    let vm = || path_param("vm", "VM name", "string");
    let nf = ("404", "not found");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Standby gateway API",
            "version": "1",
            "description": "Disks, protected VMs, jobs, recovery points, policy, attachments and the replica store of one Standby gateway. Every request needs `Authorization: Bearer TOKEN` (`standby token create NAME [--read-only]`); read-only tokens may only GET. Errors are `{\"error\": MESSAGE, \"code\": CODE}`."
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "code"],
                    "properties": {
                        "error": {"type": "string", "description": "what is wrong and what to do"},
                        "code": {"type": "string", "enum": ["unauthorized", "forbidden", "invalid_request", "not_found", "conflict", "unavailable", "internal", "no_such_route", "method_not_allowed"]}
                    }
                },
                "ProtectRequest": {
                    "type": "object", "required": ["vm", "disks"], "additionalProperties": false,
                    "properties": {"vm": {"type": "string"}, "disks": {"type": "array", "items": {"type": "string"}}}
                },
                "AttachRequest": {
                    "type": "object", "required": ["vm", "disk"], "additionalProperties": false,
                    "properties": {
                        "vm": {"type": "string"},
                        "disk": {"type": "string"},
                        "point": {"type": "string", "default": "latest", "description": "latest, app (newest app-consistent), a point id or its prefix, or a UTC time YYYY-MM-DDTHH:MM[:SS] (newest at or before it)"},
                        "rw": {"type": "boolean", "default": false, "description": "writable through a local copy-on-write overlay"},
                        "accept_store_rollback": {"type": "boolean", "default": false}
                    }
                },
                "FailoverRequest": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "point": {"type": "string", "default": "latest"},
                        "accept_store_rollback": {"type": "boolean", "default": false},
                        "launch": {"type": "boolean", "default": true, "description": "test failover only: launch the policy's failover_command once the disks are served"}
                    }
                },
                "ResyncRequest": {
                    "type": "object", "additionalProperties": false,
                    "properties": {"full": {"type": "boolean", "default": false}}
                },
                "PolicyChange": {
                    "type": "object", "additionalProperties": false,
                    "description": "Unset fields keep their value; the values use the CLI's syntax (`standby policy set --help`).",
                    "properties": {
                        "interval": {"type": "string", "examples": ["5m", "continuous"]},
                        "retention": {"type": "string", "examples": ["24h", "7d"]},
                        "app_consistent": {"type": "string", "examples": ["4h", "off"]},
                        "freeze_cmd": {"type": "string"},
                        "thaw_cmd": {"type": "string"},
                        "initial_start": {"type": "string", "examples": ["now", "1767225600"]},
                        "resync_window": {"type": "string", "examples": ["18:00-08:00", "always"]},
                        "bandwidth": {"type": "string", "examples": ["100M", "0"]},
                        "fold_patch_bytes": {"type": "string", "examples": ["256M"]},
                        "failover_command": {"type": "string"},
                        "retry_time_scale": {"type": "integer", "minimum": 1}
                    }
                }
            }
        },
        "paths": {
            "/api/v1/openapi.json": {"get": op("This document", "the OpenAPI document", &[])},
            "/api/v1/disks": {"get": op("Disks of the data directory", "list of disks", &[])},
            "/api/v1/disks/{name}": {"get": with_params(op("One disk", "the disk", &[nf]), path_param("name", "disk name", "string"))},
            "/api/v1/vms": {
                "get": op("Protected VMs: state, health, RPO, log backlog, last error, next retry", "list of VMs", &[]),
                "post": action("Protect a VM (initial replication starts)", "201", "registered", Some(json!({"$ref": "#/components/schemas/ProtectRequest"})))
            },
            "/api/v1/vms/{vm}": {"get": with_params(op("One protected VM", "the VM", &[nf]), vm())},
            "/api/v1/vms/{vm}/unprotect": {"post": with_params(action("Stop protecting a VM (its points stay in the store)", "200", "unprotected", None), vm())},
            "/api/v1/vms/{vm}/resync": {"post": with_params(action("Resynchronize now", "200", "resync requested", Some(json!({"$ref": "#/components/schemas/ResyncRequest"}))), vm())},
            "/api/v1/vms/{vm}/resume": {"post": with_params(action("Resume a Critical VM or retry a waiting one now", "200", "outcome", None), vm())},
            "/api/v1/jobs": {"get": with_params(op("Jobs, newest first", "list of jobs", &[("400", "bad limit")]), json!([
                {"name": "vm", "in": "query", "required": false, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20}}
            ]))},
            "/api/v1/jobs/{id}": {"get": with_params(op("One job with its steps; a job that has them also its live `counts` and its `result` (store verify). `vm` is null for a job of the whole store", "the job", &[nf]), path_param("id", "job id", "integer"))},
            "/api/v1/points": {"get": with_params(op("Recovery points in the store, oldest first", "list of points", &[("400", "bad VM name"), ("503", "store not reachable")]), json!([
                {"name": "vm", "in": "query", "required": false, "schema": {"type": "string"}}
            ]))},
            "/api/v1/policy": {
                "get": op("The site's replication policy", "the policy", &[]),
                "post": action("Change the policy (all or nothing)", "200", "the new policy", Some(json!({"$ref": "#/components/schemas/PolicyChange"})))
            },
            "/api/v1/attachments": {
                "get": op("Recovery points served as exports: attach, test failover, failover (with hydration)", "list of attachments", &[]),
                "post": action("Attach a recovery point as an NBD export; answers once it is served, with its `uri`", "201", "attached", Some(json!({"$ref": "#/components/schemas/AttachRequest"})))
            },
            "/api/v1/attachments/{export}/detach": {"post": with_params(action("Stop serving an attached point (not a test failover's or failover's exports)", "200", "detached", None), path_param("export", "export name", "string"))},
            "/api/v1/vms/{vm}/failover/test": {"post": with_params(test_failover(), vm())},
            "/api/v1/vms/{vm}/failover/cleanup": {"post": with_params(action("Remove a test failover: stop its launched VM (SIGTERM, SIGKILL after 5 s; only the recorded process), then drop its exports and overlays. `stopped_vms` says what happened to the VM", "200", "removed", None), vm())},
            "/api/v1/vms/{vm}/failover/prepare": {"post": with_params(action("Planned failover, on the primary, after the VM is shut down: replicate the last changes, then stop protecting it here. Answers 202 with the job", "202", "started", None), vm())},
            "/api/v1/vms/{vm}/failover/start": {"post": with_params(action("Failover, on the recovery gateway: serve the VM's disks from a point, hydrate them into local images. Answers 202 with the job", "202", "started", Some(json!({"$ref": "#/components/schemas/FailoverRequest"}))), vm())},
            "/api/v1/vms/{vm}/failover/commit": {"post": with_params(action("Commit a failover: once hydrated, the disks become local disks. Answers 202 with the job (it finishes when hydration does)", "202", "started", None), vm())},
            "/api/v1/store": {"get": op("The replica store: location, settings, chunks and bytes, points per VM", "store information", &[("503", "store not reachable")])},
            "/api/v1/store/verify": {"post": action("Verify a point or the whole store (re-read and re-hash every chunk) as a `store-verify` job of no VM. Answers 202 with `job` once it started (409 while another verification runs, 404 for an unknown point); GET /api/v1/jobs/{id} shows its `counts` while it runs and its `result` (`ok`, counts, missing/corrupt chunks, bad objects, broken points) at the end; problems found make the job `failed`", "202", "started", Some(json!({"type": "object", "additionalProperties": false, "properties": {"point": {"type": "string", "description": "VM/ID, ID or VM/latest; none: the whole store"}}})))},
            "/metrics": {"get": op("Prometheus metrics (OpenMetrics text, see docs/metrics.md)", "metrics", &[])}
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn document_matches_the_routes() {
        let spec = spec();
        let mut documented = BTreeSet::new();
        for (path, ops) in spec["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = super::super::router::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, routed);
    }
}

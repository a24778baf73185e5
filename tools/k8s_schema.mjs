// Validates Kubernetes objects against the schemas of the npm packages pinned in
// tools/ops-schemas/package-lock.json (installed by `just ops-schemas` into target/ops-schemas):
//
//   @kubernetes-models/istio          Istio's CRDs (generated from Istio 1.29.2's crd-all.gen.yaml)
//   @kubernetes-models/envoy-gateway  Envoy Gateway's API types (generated from envoyproxy/gateway v1.7.3)
//   kubernetes-models                 Kubernetes' built-in kinds (ConfigMap, Deployment, ...)
//
//   node tools/k8s_schema.mjs SCHEMA_DIR < request.json > result.json
//
// request: {"documents": [{"id": "...", "doc": {...}, "patch": false}]}; `patch: true` marks a
// strategic merge patch of an apps/v1 Deployment (missing required fields are not errors there).
// result: {"packages": {name: version}, "results": [{"id": "...", "errors": ["path: message", ...]}]}
//
// Like the API server with a structural schema, a field the schema does not declare is an error
// ("unknown field ...: the API server prunes it", or rejects it with kubectl's default strict field
// validation), as are wrong types, enum values, patterns, bounds and missing required fields. The
// packages' validators are compiled ajv code that checks types but not unknown fields (CRDs have no
// `additionalProperties: false`; the API server prunes instead), so each object is handed to the
// validator behind a Proxy that records which field names the validator looks up: a validator
// reads every property its schema declares, so in an object where it read any name, a key it never
// read is one the schema does not know. Objects where it reads no name at all are free-form
// (x-kubernetes-preserve-unknown-fields, apiextensions JSON: WasmPlugin pluginConfig, EnvoyFilter
// patch values, EnvoyExtensionPolicy wasm config) and are not checked, like the API server does.
// CEL rules (x-kubernetes-validations) are not in these packages; tools/check_ops.py restates the
// few that apply to the shipped manifests.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const SCHEMAS = {
  "extensions.istio.io/v1alpha1/WasmPlugin": ["@kubernetes-models/istio", "ExtensionsIstioIoV1alpha1WasmPlugin"],
  "networking.istio.io/v1alpha3/EnvoyFilter": ["@kubernetes-models/istio", "NetworkingIstioIoV1alpha3EnvoyFilter"],
  "gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy": ["@kubernetes-models/envoy-gateway", "ComGithubEnvoyproxyGatewayApiV1alpha1EnvoyExtensionPolicy"],
  "gateway.envoyproxy.io/v1alpha1/EnvoyProxy": ["@kubernetes-models/envoy-gateway", "ComGithubEnvoyproxyGatewayApiV1alpha1EnvoyProxy"],
  "v1/ConfigMap": ["kubernetes-models", "IoK8sApiCoreV1ConfigMap"],
  "apps/v1/Deployment": ["kubernetes-models", "IoK8sApiAppsV1Deployment"],
};

const dir = process.argv[2];
if (!dir) {
  console.error("usage: node tools/k8s_schema.mjs SCHEMA_DIR < request.json");
  process.exit(2);
}
const modules = join(dir, "node_modules");
const request = JSON.parse(readFileSync(0, "utf8"));

const packages = {};
for (const name of new Set(Object.values(SCHEMAS).map(([p]) => p))) {
  packages[name] = JSON.parse(readFileSync(join(modules, name, "package.json"), "utf8")).version;
}

const loaded = new Map();
async function validator(key) {
  if (!loaded.has(key)) {
    const [pkg, file] = SCHEMAS[key];
    const url = pathToFileURL(join(modules, pkg, "_schemas", `${file}.js`)).href;
    loaded.set(key, (await import(url)).validate);
  }
  return loaded.get(key);
}

// A copy of `value` whose objects record the field names looked up on them.
function tracked(value, path, nodes) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map((v, i) => tracked(v, `${path}[${i}]`, nodes));
  const node = { path, keys: Object.keys(value), read: new Set() };
  nodes.push(node);
  const target = {};
  for (const [k, v] of Object.entries(value)) target[k] = tracked(v, join_path(path, k), nodes);
  return new Proxy(target, {
    get(t, k, r) {
      if (typeof k === "string") node.read.add(k);
      return Reflect.get(t, k, r);
    },
    has(t, k) {
      if (typeof k === "string") node.read.add(k);
      return Reflect.has(t, k);
    },
  });
}

// `spec.match[0].mode`, `metadata.annotations["proxy.istio.io/config"]`
function join_path(path, key) {
  if (/^[A-Za-z_$][\w$-]*$/.test(key)) return path ? `${path}.${key}` : key;
  return `${path}[${JSON.stringify(key)}]`;
}

function where(instancePath) {
  // "/spec/match/0/mode" -> "spec.match[0].mode"
  return instancePath
    .split("/")
    .slice(1)
    .map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"))
    .reduce((acc, s) => (/^\d+$/.test(s) ? `${acc}[${s}]` : join_path(acc, s)), "");
}

function message(e) {
  const p = e.params || {};
  switch (e.keyword) {
    case "type":
      return `must be of type ${p.type}`;
    case "enum":
      return `must be one of ${JSON.stringify(p.allowedValues)}`;
    case "required":
      return `required field ${p.missingProperty} is missing`;
    case "pattern":
      return `must match ${p.pattern}`;
    default:
      return `fails ${e.keyword} ${JSON.stringify(p)}`;
  }
}

const results = [];
for (const { id, doc, patch } of request.documents) {
  const errors = [];
  const key = patch ? "apps/v1/Deployment" : `${doc?.apiVersion}/${doc?.kind}`;
  if (!SCHEMAS[key]) {
    errors.push(`no schema for apiVersion ${doc?.apiVersion} kind ${doc?.kind} (add it to tools/k8s_schema.mjs)`);
    results.push({ id, errors });
    continue;
  }
  const validate = await validator(key);
  const nodes = [];
  const ok = validate(tracked(doc, "", nodes));
  if (!ok) {
    for (const e of validate.errors || []) {
      if (patch && e.keyword === "required") continue;
      errors.push(`${where(e.instancePath) || "(document)"}: ${message(e)}`);
    }
  }
  for (const node of nodes) {
    if (node.read.size === 0) continue; // free-form object
    for (const k of node.keys) {
      if (!node.read.has(k)) {
        errors.push(`unknown field ${join_path(node.path, k)}: not in the ${key} schema (the API server prunes it, or rejects it under strict field validation)`);
      }
    }
  }
  results.push({ id, errors: [...new Set(errors)] });
}
process.stdout.write(JSON.stringify({ packages, results }));

#!/usr/bin/env node
// Validates a rendered Kubernetes YAML stream (the output of deploy/helm/render) offline.
//
//   node validate.mjs [--bin-dir DIR] FILE.yaml...
//
// Every document must be a known apiVersion/kind and pass two checks:
//  1. the OpenAPI schema of its kind (kubernetes-models: types, required fields, enums,
//     formats; @kubernetes-models/prometheus-operator for monitoring.coreos.com), and
//  2. strict fields: the document, as a TypeScript object literal typed with the same
//     package's interfaces, must type-check. TypeScript's excess-property check rejects
//     any field the API does not define (what `kubectl apply --validate=strict` or the API
//     server's strict field validation would reject; the OpenAPI schemas alone allow it).
// With --bin-dir, every container that runs a kvrelay binary is also run with its
// rendered command, arguments, environment and mounted ConfigMaps (paths moved to a
// temporary folder) plus --version, so each flag must exist and parse; `kvrelay
// make-model` runs for real. Exit status 1 and one line per problem on any failure.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import YAML from "yaml";
import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

// apiVersion group -> package holding its models.
const PACKAGES = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

function modelSpecifier(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" || !/^[A-Za-z0-9]+$/.test(kind)) {
    return null;
  }
  const slash = apiVersion.indexOf("/");
  const group = slash < 0 ? "" : apiVersion.slice(0, slash);
  const pkg = PACKAGES[group] ?? "kubernetes-models";
  return `${pkg}/${apiVersion}/${kind}`;
}

function parseArgs(argv) {
  const opts = { binDir: "", files: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--bin-dir") opts.binDir = argv[++i] ?? "";
    else if (argv[i].startsWith("--bin-dir=")) opts.binDir = argv[i].slice("--bin-dir=".length);
    else if (argv[i].startsWith("-")) throw new Error(`unknown option ${argv[i]}`);
    else opts.files.push(argv[i]);
  }
  if (opts.files.length === 0) throw new Error("usage: validate.mjs [--bin-dir DIR] FILE.yaml...");
  return opts;
}

// Reads every document of every file: {file, index, source, obj, label}.
function readDocuments(files, problems) {
  const docs = [];
  for (const file of files) {
    const text = fs.readFileSync(file, "utf8");
    YAML.parseAllDocuments(text, { prettyErrors: true }).forEach((doc, index) => {
      const comment = `${doc.commentBefore ?? ""}\n${doc.contents?.commentBefore ?? ""}`;
      const source = /Source:\s*(\S+)/.exec(comment)?.[1] ?? "(no # Source)";
      const where = `${path.basename(file)} #${index + 1} ${source}`;
      if (doc.errors.length > 0) {
        for (const e of doc.errors) problems.push(`${where}: YAML: ${e.message}`);
        return;
      }
      for (const w of doc.warnings) problems.push(`${where}: YAML: ${w.message}`);
      const obj = doc.toJS({ maxAliasCount: 100 });
      if (obj === null || obj === undefined) return; // empty or comments only
      if (typeof obj !== "object" || Array.isArray(obj)) {
        problems.push(`${where}: not a mapping`);
        return;
      }
      const label = `${where} ${obj.kind ?? "?"}/${obj.metadata?.name ?? "?"}`;
      docs.push({ file, index, source, obj, label });
    });
  }
  return docs;
}

// Check 1: the kind's OpenAPI schema (ajv validators compiled into kubernetes-models).
async function validateSchemas(docs, problems) {
  const names = new Set();
  for (const d of docs) {
    const spec = modelSpecifier(d.obj.apiVersion, d.obj.kind);
    let mod = null;
    if (spec) {
      try {
        mod = await import(spec);
      } catch (e) {
        if (e.code !== "ERR_PACKAGE_PATH_NOT_EXPORTED" && e.code !== "ERR_MODULE_NOT_FOUND") throw e;
      }
    }
    const Model = mod?.[d.obj.kind];
    if (!Model || Model.apiVersion !== d.obj.apiVersion || Model.kind !== d.obj.kind) {
      problems.push(`${d.label}: no schema for apiVersion ${JSON.stringify(d.obj.apiVersion)} kind ${JSON.stringify(d.obj.kind)}`);
      continue;
    }
    d.spec = spec;
    try {
      new Model(d.obj).validate();
    } catch (e) {
      if (!Array.isArray(e.errors)) throw e;
      for (const err of e.errors) {
        const extra = err.params?.allowedValues ? ` (${err.params.allowedValues.join(", ")})` : "";
        problems.push(`${d.label}: ${err.instancePath || "/"} ${err.message}${extra}`);
      }
    }
    const name = d.obj.metadata?.name;
    if (typeof name !== "string" || !/^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/.test(name)) {
      problems.push(`${d.label}: metadata.name ${JSON.stringify(name)} is not a DNS-1123 subdomain`);
    }
    const key = `${d.file}: ${d.obj.apiVersion}/${d.obj.kind}/${d.obj.metadata?.namespace ?? ""}/${name}`;
    if (names.has(key)) problems.push(`${d.label}: duplicate object ${key}`);
    names.add(key);
  }
}

// Check 2: strict fields through TypeScript. Each document becomes
//   const doc_N: IKind = { ...the document... };
// in one virtual file; a line map turns a diagnostic's position back into a JSON path.
function validateStrictFields(docs, problems) {
  const typed = docs.filter((d) => d.spec);
  if (typed.length === 0) return;
  const lines = [];
  const lineInfo = []; // line number -> {doc, path}
  const emit = (text, doc, p) => {
    lines.push(text);
    lineInfo.push({ doc, path: p });
  };
  typed.forEach((d, i) => {
    emit(`import type { I${d.obj.kind} as T${i} } from ${JSON.stringify(d.spec)};`, d, "");
  });
  const write = (value, indent, prefix, doc, p, suffix) => {
    const pad = "  ".repeat(indent);
    if (Array.isArray(value)) {
      if (value.length === 0) return emit(`${pad}${prefix}[]${suffix}`, doc, p);
      emit(`${pad}${prefix}[`, doc, p);
      value.forEach((v, k) => write(v, indent + 1, "", doc, `${p}/${k}`, ","));
      return emit(`${pad}]${suffix}`, doc, p);
    }
    if (value !== null && typeof value === "object") {
      const entries = Object.entries(value);
      if (entries.length === 0) return emit(`${pad}${prefix}{}${suffix}`, doc, p);
      emit(`${pad}${prefix}{`, doc, p);
      for (const [k, v] of entries) {
        write(v, indent + 1, `${JSON.stringify(k)}: `, doc, `${p}/${k}`, ",");
      }
      return emit(`${pad}}${suffix}`, doc, p);
    }
    // Dates never reach here (YAML 1.2 core schema); bigints are written as numbers.
    const literal = typeof value === "bigint" ? value.toString() : JSON.stringify(value);
    return emit(`${pad}${prefix}${literal}${suffix}`, doc, p);
  };
  typed.forEach((d, i) => write(d.obj, 0, `export const doc_${i}: T${i} = `, d, "", ";"));

  const fileName = path.join(here, "__rendered_manifests__.ts");
  const source = lines.join("\n") + "\n";
  const options = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2020,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    types: [],
  };
  const host = ts.createCompilerHost(options);
  const readFile = host.readFile.bind(host);
  const fileExists = host.fileExists.bind(host);
  const getSourceFile = host.getSourceFile.bind(host);
  host.readFile = (f) => (f === fileName ? source : readFile(f));
  host.fileExists = (f) => f === fileName || fileExists(f);
  host.getSourceFile = (f, lang, ...rest) =>
    f === fileName ? ts.createSourceFile(f, source, lang) : getSourceFile(f, lang, ...rest);
  const program = ts.createProgram([fileName], options, host);
  const diagnostics = [...program.getSyntacticDiagnostics(), ...program.getSemanticDiagnostics()];
  for (const diag of diagnostics) {
    const message = ts.flattenDiagnosticMessageText(diag.messageText, "\n    ");
    if (!diag.file || diag.file.fileName !== fileName) {
      problems.push(`typescript: ${message}`);
      continue;
    }
    const { line } = diag.file.getLineAndCharacterOfPosition(diag.start ?? 0);
    const info = lineInfo[line];
    problems.push(`${info.doc.label}: ${info.path || "/"}: ${message}`);
  }
}

// --bin-dir: run every kvrelay container's command line with --version.
function checkCommands(docs, binDir, problems) {
  const configMaps = new Map();
  for (const d of docs) {
    if (d.obj.kind === "ConfigMap") configMaps.set(d.obj.metadata?.name, d.obj.data ?? {});
  }
  let checked = 0;
  for (const d of docs) {
    const pod = d.obj.spec?.template?.spec;
    if (!pod) continue;
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "kvrelay-validate-"));
    try {
      // Every volume becomes a folder; ConfigMap volumes get their data.
      const volumeDirs = new Map();
      for (const v of pod.volumes ?? []) {
        const dir = path.join(work, "volumes", v.name);
        fs.mkdirSync(dir, { recursive: true });
        if (v.configMap) {
          const data = configMaps.get(v.configMap.name);
          if (!data) problems.push(`${d.label}: volume ${v.name}: ConfigMap ${v.configMap.name} is not in the stream`);
          for (const [k, val] of Object.entries(data ?? {})) fs.writeFileSync(path.join(dir, k), val);
        }
        volumeDirs.set(v.name, dir);
      }
      const containers = [...(pod.initContainers ?? []), ...(pod.containers ?? [])];
      for (const c of containers) {
        const argv = [...(c.command ?? []), ...(c.args ?? [])];
        if (!argv[0] || !/^kvrelay(-router|-prefill|-decode)?$/.test(argv[0])) continue;
        const mounts = (c.volumeMounts ?? []).map((m) => [m.mountPath.replace(/\/$/, ""), volumeDirs.get(m.name)]);
        mounts.sort((a, b) => b[0].length - a[0].length);
        const env = {};
        for (const e of c.env ?? []) {
          env[e.name] = e.value ?? (e.valueFrom?.fieldRef?.fieldPath === "status.podIP" ? "127.0.0.1" : `${e.name.toLowerCase()}-0`);
        }
        const expand = (s) =>
          s.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, name) => (name in env ? env[name] : m));
        // A path under a mount (the longest one), alone or after "--flag=", moves once.
        const relocate = (s) => {
          const eq = s.startsWith("-") ? s.indexOf("=") + 1 : 0;
          const value = s.slice(eq);
          for (const [mountPath, dir] of mounts) {
            if (value === mountPath || value.startsWith(`${mountPath}/`)) {
              return s.slice(0, eq) + dir + value.slice(mountPath.length);
            }
          }
          return s;
        };
        const args = argv.slice(1).map((a) => relocate(expand(a)));
        const isCli = argv[0] === "kvrelay";
        if (!isCli) args.push("--version");
        const bin = path.join(binDir, argv[0]);
        const r = spawnSync(bin, args, { env: { ...process.env, ...env }, encoding: "utf8", timeout: 120000 });
        checked++;
        if (r.error || r.status !== 0) {
          const why = r.error ? r.error.message : (r.stderr || r.stdout).trim().split("\n").slice(-3).join(" | ");
          problems.push(`${d.label}: container ${c.name}: \`${argv[0]} ${args.join(" ")}\` failed (exit ${r.status}): ${why}`);
        }
      }
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  }
  return checked;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const problems = [];
  const docs = readDocuments(opts.files, problems);
  await validateSchemas(docs, problems);
  validateStrictFields(docs, problems);
  let commands = "";
  if (opts.binDir) commands = `, ${checkCommands(docs, opts.binDir, problems)} kvrelay command lines run`;
  const kinds = {};
  for (const d of docs) kinds[d.obj.kind] = (kinds[d.obj.kind] ?? 0) + 1;
  const summary = Object.entries(kinds).map(([k, n]) => `${n} ${k}`).join(", ");
  if (problems.length > 0) {
    for (const p of problems) console.error(`INVALID ${p}`);
    console.error(`validate: ${problems.length} problem(s) in ${docs.length} document(s) of ${opts.files.join(" ")}`);
    process.exit(1);
  }
  console.log(`validate: ${docs.length} document(s) valid (${summary})${commands}`);
}

main().catch((e) => {
  console.error(`validate: ${e.stack ?? e}`);
  process.exit(1);
});

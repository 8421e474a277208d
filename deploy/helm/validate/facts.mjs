#!/usr/bin/env node
// Checks facts about renders of the kvrelay chart that a schema cannot see.
//
//   node facts.mjs --default F --gpu F --service-monitor F --pod-monitor F
//                  [--dashboards-dir DIR] [--rules-file FILE --values CHART/values.yaml]
//
// Prints "ok - ..." / "not ok - ..." per fact and exits 1 if any failed.
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";

const opts = {};
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, "");
  const value = process.argv[i + 1];
  if (value === undefined) throw new Error(`missing value for ${process.argv[i]}`);
  opts[key] = value;
}
for (const required of ["default", "gpu", "service-monitor", "pod-monitor"]) {
  if (!opts[required]) throw new Error(`--${required} FILE is required`);
}

const load = (file) =>
  YAML.parseAllDocuments(fs.readFileSync(file, "utf8"))
    .map((d) => d.toJS())
    .filter((o) => o && typeof o === "object");
const renders = {
  default: load(opts.default),
  gpu: load(opts.gpu),
  serviceMonitor: load(opts["service-monitor"]),
  podMonitor: load(opts["pod-monitor"]),
};

let passed = 0;
let failed = 0;
function fact(description, check) {
  let problem;
  try {
    problem = check();
  } catch (e) {
    problem = e.stack ?? String(e);
  }
  if (problem) {
    failed++;
    console.log(`not ok - ${description}: ${problem}`);
  } else {
    passed++;
    console.log(`ok - ${description}`);
  }
}

const ofKind = (docs, kind) => docs.filter((o) => o.kind === kind);
const deployment = (docs, component) =>
  ofKind(docs, "Deployment").find((d) => d.metadata.labels?.["app.kubernetes.io/component"] === component);
const mainContainer = (d) => d.spec.template.spec.containers[0];
const flagValue = (args, name) => {
  const prefix = `--${name}=`;
  const hit = [...args].reverse().find((a) => a.startsWith(prefix));
  return hit === undefined ? undefined : hit.slice(prefix.length);
};
// The flags a container runs with: its --flagfile(s) from the ConfigMap, then its args.
function effectiveFlags(docs, d) {
  const c = mainContainer(d);
  const pod = d.spec.template.spec;
  const flags = [];
  for (const a of c.args ?? []) {
    const file = flagValue([a], "flagfile");
    if (file === undefined) {
      flags.push(a);
      continue;
    }
    const mount = (c.volumeMounts ?? []).find((m) => file.startsWith(`${m.mountPath}/`));
    const volume = pod.volumes.find((v) => v.name === mount?.name);
    const cm = ofKind(docs, "ConfigMap").find((o) => o.metadata.name === volume?.configMap?.name);
    const text = cm?.data?.[path.basename(file)];
    if (text === undefined) throw new Error(`${d.metadata.name}: --flagfile=${file} is not in a mounted ConfigMap`);
    flags.push(...text.split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#")));
  }
  return flags;
}
const components = ["router", "prefill", "decode"];
const workers = ["prefill", "decode"];

for (const [name, docs] of Object.entries(renders)) {
  fact(`${name}: one Deployment per component`, () => {
    const missing = components.filter((c) => !deployment(docs, c));
    return missing.length ? `missing ${missing.join(", ")}` : "";
  });
  fact(`${name}: every container has gRPC startup, readiness and liveness probes`, () => {
    const bad = [];
    for (const d of ofKind(docs, "Deployment")) {
      for (const c of d.spec.template.spec.containers) {
        for (const p of ["startupProbe", "readinessProbe", "livenessProbe"]) {
          if (!c[p]?.grpc?.port) bad.push(`${d.metadata.name}/${c.name} ${p}`);
        }
      }
    }
    return bad.join(", ");
  });
  fact(`${name}: router readiness asks for kvrelay.v1.Generation, liveness for the whole server`, () => {
    const c = mainContainer(deployment(docs, "router"));
    if (c.readinessProbe.grpc.service !== "kvrelay.v1.Generation") return `readiness service ${c.readinessProbe.grpc.service}`;
    return c.livenessProbe.grpc.service ? `liveness service ${c.livenessProbe.grpc.service}` : "";
  });
  fact(`${name}: terminationGracePeriodSeconds exceeds --drain_seconds`, () => {
    const bad = [];
    for (const comp of components) {
      const d = deployment(docs, comp);
      const drain = Number(flagValue(effectiveFlags(docs, d), "drain_seconds"));
      if (!(d.spec.template.spec.terminationGracePeriodSeconds > drain)) {
        bad.push(`${comp}: ${d.spec.template.spec.terminationGracePeriodSeconds} <= ${drain}`);
      }
    }
    return bad.join(", ");
  });
  fact(`${name}: router and workers share --block_size and --model; workers share --kv_dtype`, () => {
    const get = (comp, flag) => flagValue(effectiveFlags(docs, deployment(docs, comp)), flag);
    for (const flag of ["block_size", "model"]) {
      const values = components.map((c) => get(c, flag));
      if (values.some((v) => v === undefined || v !== values[0])) return `--${flag}: ${values.join(" / ")}`;
    }
    const dtypes = workers.map((c) => get(c, "kv_dtype"));
    return dtypes[0] && dtypes[0] === dtypes[1] ? "" : `--kv_dtype: ${dtypes.join(" / ")}`;
  });
  fact(`${name}: workers listen on 0.0.0.0, advertise $(POD_IP) and dial dns:/// of the headless router Service`, () => {
    const headless = ofKind(docs, "Service").find((s) => s.spec.clusterIP === "None" && s.metadata.labels?.["app.kubernetes.io/component"] === "router");
    if (!headless) return "no headless router Service";
    if (headless.spec.publishNotReadyAddresses !== true) return "headless Service does not publish not-ready addresses";
    const port = headless.spec.ports.find((p) => p.name === "grpc").port;
    const bad = [];
    for (const comp of workers) {
      const d = deployment(docs, comp);
      const c = mainContainer(d);
      const flags = effectiveFlags(docs, d);
      const router = flagValue(flags, "router") ?? "";
      const m = /^dns:\/\/\/([^.]+)\.([^.]+)\.svc\.[^:]+:(\d+)$/.exec(router);
      if (!m || m[1] !== headless.metadata.name || Number(m[3]) !== port) bad.push(`${comp} --router=${router}`);
      if (flagValue(flags, "advertise_host") !== "$(POD_IP)") bad.push(`${comp} --advertise_host`);
      if (!c.env.some((e) => e.name === "POD_IP" && e.valueFrom?.fieldRef?.fieldPath === "status.podIP")) bad.push(`${comp} POD_IP env`);
      if (!(flagValue(flags, "listen") ?? "").startsWith("0.0.0.0:")) bad.push(`${comp} --listen`);
      if (!(flagValue(flags, "metrics_listen") ?? "").startsWith("0.0.0.0:")) bad.push(`${comp} --metrics_listen`);
    }
    return bad.join(", ");
  });
  fact(`${name}: a PodDisruptionBudget selects each component`, () => {
    const missing = components.filter((comp) => {
      const labels = deployment(docs, comp).spec.template.metadata.labels;
      return !ofKind(docs, "PodDisruptionBudget").some((p) =>
        Object.entries(p.spec.selector.matchLabels).every(([k, v]) => labels[k] === v));
    });
    return missing.length ? `none for ${missing.join(", ")}` : "";
  });
}

const gpuLimits = (docs, comp) => mainContainer(deployment(docs, comp)).resources?.limits ?? {};
fact("default: no container asks for nvidia.com/gpu or an RDMA device", () => {
  const bad = components.filter((c) => Object.keys(gpuLimits(renders.default, c)).some((k) => k.includes("/")));
  return bad.join(", ");
});
fact("gpu: prefill and decode ask for nvidia.com/gpu and an RDMA device, and run the CUDA image", () => {
  const bad = [];
  for (const comp of workers) {
    const limits = gpuLimits(renders.gpu, comp);
    if (!(limits["nvidia.com/gpu"] >= 1)) bad.push(`${comp}: nvidia.com/gpu=${limits["nvidia.com/gpu"]}`);
    if (!Object.keys(limits).some((k) => k.startsWith("rdma/"))) bad.push(`${comp}: no rdma/ resource`);
    const image = mainContainer(deployment(renders.gpu, comp)).image;
    if (!image.endsWith("-cuda")) bad.push(`${comp}: image ${image}`);
  }
  return bad.join(", ");
});
fact("workers run --device auto by default and --device cuda in the GPU render", () => {
  const bad = [];
  for (const [name, docs, want] of [["default", renders.default, "auto"], ["gpu", renders.gpu, "cuda"]]) {
    for (const comp of workers) {
      const got = flagValue(effectiveFlags(docs, deployment(docs, comp)), "device");
      if (got !== want) bad.push(`${name} ${comp}: --device=${got}`);
    }
  }
  return bad.join(", ");
});
fact("gpu: the model comes from a PersistentVolumeClaim (no make-model init container)", () => {
  const d = deployment(renders.gpu, "decode");
  if (d.spec.template.spec.initContainers?.length) return "init containers present";
  return d.spec.template.spec.volumes.some((v) => v.name === "model" && v.persistentVolumeClaim?.claimName) ? "" : "no PVC model volume";
});
fact("default: the demo model is written by `kvrelay make-model` into the model folder", () => {
  const d = deployment(renders.default, "router");
  const init = d.spec.template.spec.initContainers?.[0];
  const model = flagValue(effectiveFlags(renders.default, d), "model");
  if (!init || init.command.join(" ") !== "kvrelay make-model") return "no make-model init container";
  return flagValue(init.args, "out") === model ? "" : `--out=${flagValue(init.args, "out")} but --model=${model}`;
});
fact("service-monitor: a ServiceMonitor on port metrics and a metrics Service per component", () => {
  const docs = renders.serviceMonitor;
  const sm = ofKind(docs, "ServiceMonitor");
  if (sm.length !== 1 || sm[0].spec.endpoints[0].port !== "metrics") return `${sm.length} ServiceMonitor(s)`;
  const withMetrics = ofKind(docs, "Service").filter((s) => s.spec.ports.some((p) => p.name === "metrics"));
  const comps = withMetrics.map((s) => s.metadata.labels["app.kubernetes.io/component"]).sort();
  if (comps.join(",") !== "decode,prefill,router") return `metrics Services for ${comps.join(",")}`;
  return ofKind(docs, "PodMonitor").length ? "a PodMonitor too" : "";
});
fact("pod-monitor: one PodMonitor on port metrics, no ServiceMonitor", () => {
  const pm = ofKind(renders.podMonitor, "PodMonitor");
  if (pm.length !== 1 || pm[0].spec.podMetricsEndpoints[0].port !== "metrics") return `${pm.length} PodMonitor(s)`;
  return ofKind(renders.podMonitor, "ServiceMonitor").length ? "a ServiceMonitor too" : "";
});
fact("default: no prometheus-operator objects", () =>
  renders.default.filter((o) => o.apiVersion?.startsWith("monitoring.coreos.com/")).map((o) => o.kind).join(", "));

if (opts["rules-file"]) {
  const disabled = opts.values
    ? YAML.parse(fs.readFileSync(opts.values, "utf8")).metrics.prometheusRule.disabledAlerts ?? []
    : [];
  fact(`service-monitor: the PrometheusRule carries the rules of ${path.basename(opts["rules-file"])} but [${disabled}]`, () => {
    const rule = ofKind(renders.serviceMonitor, "PrometheusRule");
    if (rule.length !== 1) return `${rule.length} PrometheusRule(s)`;
    const want = YAML.parse(fs.readFileSync(opts["rules-file"], "utf8")).groups
      .map((g) => ({ ...g, rules: g.rules.filter((r) => !disabled.includes(r.alert)) }))
      .filter((g) => g.rules.length > 0);
    // Same content; key order may differ (toYaml sorts keys).
    const canonical = (v) => Array.isArray(v) ? v.map(canonical)
      : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]))
      : v;
    const a = JSON.stringify(canonical(rule[0].spec.groups));
    return a === JSON.stringify(canonical(want)) ? "" : "groups differ from the file";
  });
}

const dashboardFiles = opts["dashboards-dir"] && fs.existsSync(opts["dashboards-dir"])
  ? fs.readdirSync(opts["dashboards-dir"]).filter((f) => f.endsWith(".json")).sort()
  : [];
for (const [name, docs] of [["default", renders.default], ["gpu", renders.gpu]]) {
  fact(`${name}: one Grafana dashboard ConfigMap (grafana_dashboard: "1") per dashboard JSON (${dashboardFiles.length})`, () => {
    const cms = ofKind(docs, "ConfigMap").filter((c) => c.metadata.labels?.grafana_dashboard === "1");
    const keys = cms.flatMap((c) => Object.keys(c.data)).sort();
    if (keys.join(",") !== dashboardFiles.join(",")) return `ConfigMaps hold [${keys}] but the folder has [${dashboardFiles}]`;
    for (const c of cms) {
      for (const [file, text] of Object.entries(c.data)) {
        const want = fs.readFileSync(path.join(opts["dashboards-dir"], file), "utf8");
        if (text.trimEnd() !== want.trimEnd()) return `${file} differs from the file`;
      }
    }
    return "";
  });
}

console.log(`facts: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);

// Validates ServiceMonitor objects against the prometheus-operator CRD schema
// (kubernetes-validate has none for this CRD).
// usage: node validate-servicemonitors.mjs FILE.json  (a JSON array of ServiceMonitor objects)
// chart_check.py copies this file next to the node_modules it installed: ESM
// imports resolve from the script's own directory, not from NODE_PATH.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
let bad = 0;
for (const obj of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  try {
    new ServiceMonitor(obj).validate();
    console.log(`ServiceMonitor ${obj.metadata.name}: valid`);
  } catch (e) {
    bad++;
    console.log(`ServiceMonitor ${obj.metadata.name}: ${e.message}`);
  }
}
process.exit(bad ? 1 : 0);

// Builds a JavaScript plugin into a component with componentize-js (its API: the
// `jco componentize` command line needs more than this machine's registries give).
//
//   node componentize.mjs <entry.js> <wit-folder> <world> <out.wasm>
//
// The entry is an ES module exporting the world's functions; it may import other
// modules by relative path. HTTP and fetch-event support are left out (a plugin has
// no network); console output goes to stderr, whose tail becomes a failed event's
// reason.
import { writeFile } from "node:fs/promises";
import { componentize } from "@bytecodealliance/componentize-js";

const [entry, witPath, worldName, out] = process.argv.slice(2);
if (!out) {
  console.error("usage: node componentize.mjs <entry.js> <wit-folder> <world> <out.wasm>");
  process.exit(2);
}
const { component } = await componentize({
  sourcePath: entry,
  witPath,
  worldName,
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);

// Marks the two builds of `npm run build`: dist/esm as ES modules, dist/cjs as CommonJS
// (the package itself declares no "type", so each directory says what it holds).
import { writeFileSync } from "node:fs";
writeFileSync(new URL("../dist/esm/package.json", import.meta.url), JSON.stringify({ type: "module" }) + "\n");
writeFileSync(new URL("../dist/cjs/package.json", import.meta.url), JSON.stringify({ type: "commonjs" }) + "\n");

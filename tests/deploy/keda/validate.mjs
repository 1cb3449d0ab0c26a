// KEDA's objects as deploy/k8s renders them, validated strictly against KEDA's API with the models of
// @kubernetes-models/keda (pinned in package-lock.json), in two checks that each catch what the other cannot:
//
// - "schema": the model's validate(), KEDA's JSON schema compiled by ajv: types, enums, formats, required fields.
//   It accepts fields the schema does not name, as the API server would before pruning them away in silence.
// - "typescript": every object written as an object literal of the model's interface (IScaledObject, ...) and
//   type-checked by TypeScript in strict mode without emitting anything (tsc --noEmit --strict). Its excess-property
//   check refuses a field the interface does not name, at every depth; it also refuses wrong types and missing fields.
//   It reports one problem per object literal at a time (a wrong type inside `spec` hides an unknown field of `spec`
//   until it is fixed): a broken object always fails, with at least its first problem named.
//
// Reads a JSON array of objects on stdin; prints {"problems": [{object, check, path, message}]} (object: the index
// in the array, null for a problem of no object; path: "spec.triggers[0].metadata", "" for the whole object) and
// exits 0 when it could check, whatever it found. tests/deploy/manifests.py runs it (make deploy-check).

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import ts from "typescript";

const HERE = dirname(fileURLToPath(import.meta.url));
const MODELS = "@kubernetes-models/keda";
const GROUPS = new Set(["keda.sh", "eventing.keda.sh"]);
// The objects' source, given to TypeScript from memory; here so that the package resolves from node_modules beside it.
const SOURCE = join(HERE, "rendered-objects.ts");
const COMPILER_OPTIONS = {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  types: [],
  // The package's own declarations are its business; the objects' literals are ours.
  skipLibCheck: true,
};

/** The model class of an object's apiVersion and kind, or null when the package models no such KEDA kind. */
async function modelOf(object) {
  const [group, version, ...rest] = String(object?.apiVersion ?? "").split("/");
  const kind = object?.kind;
  if (!GROUPS.has(group) || !version || rest.length > 0 || typeof kind !== "string" || !/^[A-Z]\w*$/.test(kind)) {
    return null;
  }
  const specifier = `${MODELS}/${group}/${version}/${kind}`;
  let module;
  try {
    module = await import(specifier);
  } catch (error) {
    if (error.code === "ERR_MODULE_NOT_FOUND" || error.code === "ERR_PACKAGE_PATH_NOT_EXPORTED") {
      return null;
    }
    throw error;
  }
  const model = module[kind];
  // Only a kind carries its apiVersion and kind: ScaledObjectSpec, a part of one, does not.
  if (typeof model !== "function" || model.apiVersion !== object.apiVersion || model.kind !== kind) {
    return null;
  }
  return { model, specifier, kind };
}

/** "/spec/triggers/0/metadata" -> "spec.triggers[0].metadata" */
function pathOfPointer(pointer) {
  const parts = pointer
    .split("/")
    .slice(1)
    .map((part) => part.replaceAll("~1", "/").replaceAll("~0", "~"))
    .map((part) => (/^\d+$/.test(part) ? `[${part}]` : `.${part}`));
  return parts.join("").replace(/^\./, "");
}

function schemaProblems(index, model, object) {
  try {
    new model(object).validate();
    return [];
  } catch (error) {
    if (!Array.isArray(error.errors)) {
      throw error;
    }
    return error.errors.map((found) => {
      let path = pathOfPointer(found.instancePath);
      let message = found.message;
      if (found.keyword === "required") {
        path = path ? `${path}.${found.params.missingProperty}` : found.params.missingProperty;
        message = "is required";
      } else if (found.keyword === "additionalProperties") {
        path = path ? `${path}.${found.params.additionalProperty}` : found.params.additionalProperty;
        message = "is not a field of this object";
      } else if (found.keyword === "enum") {
        message = `${message}: ${found.params.allowedValues.map((value) => JSON.stringify(value)).join(", ")}`;
      }
      return { object: index, check: "schema", path, message };
    });
  }
}

/** The innermost node of `node` that holds `position`. */
function innermostAt(node, position, sourceFile) {
  const child = ts.forEachChild(node, (each) =>
    each.getStart(sourceFile) <= position && position < each.getEnd() ? each : undefined,
  );
  return child ? innermostAt(child, position, sourceFile) : node;
}

/** Where a node is inside its object literal, as a path of property names and array indexes. */
function pathOfNode(node) {
  const parts = [];
  for (let current = node; current && !ts.isVariableDeclaration(current); current = current.parent) {
    if (ts.isPropertyAssignment(current)) {
      parts.unshift(`.${current.name.text}`);
    } else if (current.parent && ts.isArrayLiteralExpression(current.parent)) {
      parts.unshift(`[${current.parent.elements.indexOf(current)}]`);
    }
  }
  return parts.join("").replace(/^\./, "");
}

function typeProblems(checked) {
  const imports = new Map();
  const declarations = [];
  for (const { index, specifier, kind, object } of checked) {
    imports.set(`I${kind}`, specifier);
    declarations.push({ index, text: `export const object${index}: I${kind} = ${JSON.stringify(object, null, 2)};\n` });
  }
  let text = [...imports].map(([name, specifier]) => `import type { ${name} } from "${specifier}";\n`).join("");
  const spans = [];
  for (const { index, text: declaration } of declarations) {
    spans.push({ index, start: text.length, end: text.length + declaration.length });
    text += declaration;
  }

  const host = ts.createCompilerHost(COMPILER_OPTIONS, true);
  const { fileExists, readFile, getSourceFile } = host;
  host.fileExists = (name) => name === SOURCE || fileExists.call(host, name);
  host.readFile = (name) => (name === SOURCE ? text : readFile.call(host, name));
  host.getSourceFile = (name, languageVersion, ...rest) =>
    name === SOURCE
      ? ts.createSourceFile(name, text, languageVersion, true, ts.ScriptKind.TS)
      : getSourceFile.call(host, name, languageVersion, ...rest);
  const program = ts.createProgram([SOURCE], COMPILER_OPTIONS, host);
  const sourceFile = program.getSourceFile(SOURCE);
  return ts.getPreEmitDiagnostics(program).map((diagnostic) => {
    const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, " ");
    if (diagnostic.file?.fileName !== SOURCE || diagnostic.start === undefined) {
      return { object: null, check: "typescript", path: "", message: `TS${diagnostic.code}: ${message}` };
    }
    const span = spans.find(({ start, end }) => start <= diagnostic.start && diagnostic.start < end);
    const path = span ? pathOfNode(innermostAt(sourceFile, diagnostic.start, sourceFile)) : "";
    return { object: span ? span.index : null, check: "typescript", path, message: `TS${diagnostic.code}: ${message}` };
  });
}

const objects = JSON.parse(readFileSync(0, "utf8"));
if (!Array.isArray(objects)) {
  throw new TypeError("expected a JSON array of objects on stdin");
}
const problems = [];
const checked = [];
for (const [index, object] of objects.entries()) {
  const found = await modelOf(object);
  if (found === null) {
    const message = `${object?.apiVersion} ${object?.kind} is no KEDA kind ${MODELS} models`;
    problems.push({ object: index, check: "kind", path: "", message });
    continue;
  }
  problems.push(...schemaProblems(index, found.model, object));
  checked.push({ index, ...found, object });
}
if (checked.length > 0) {
  problems.push(...typeProblems(checked));
}
process.stdout.write(`${JSON.stringify({ problems })}\n`);

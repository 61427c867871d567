// A non-Python reader of the rewards topic: kafkajs (pure JS, its own Kafka protocol code, unlike
// librdkafka) consumes the topic from the beginning and ajv validates every value against the JSON Schema
// that schemas/ exports. Prints one JSON line per record: {"offset", "valid", "errors"}.
//
// usage: node read_rewards.mjs BOOTSTRAP TOPIC SCHEMA_JSON EXPECTED_COUNT
// env:   NODE_CLIENT_MODULES = the folder holding node_modules/ (kafkajs, ajv, ajv-formats); the test
//        installs them into a cache folder rather than the repository, so they are loaded from there.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const [bootstrap, topic, schemaPath, expectedArg] = process.argv.slice(2);
const expected = Number(expectedArg);
const require = createRequire(resolve(process.env.NODE_CLIENT_MODULES ?? ".", "noop.js"));
const { Kafka, logLevel } = require("kafkajs");
const Ajv2020 = require("ajv/dist/2020.js").default; // msgspec emits draft 2020-12 schemas
const addFormats = require("ajv-formats").default;

const ajv = new Ajv2020({ allErrors: true, strict: false });
addFormats(ajv);
const validate = ajv.compile(JSON.parse(readFileSync(schemaPath, "utf8")));

const kafka = new Kafka({
  clientId: "rlaif-node-reader",
  brokers: [bootstrap],
  logLevel: logLevel.WARN,
  retry: { retries: 3 },
});
// kafkajs only consumes through a group. Tansu holds JoinGroup for session_timeout/2 (DESIGN.md §5), so a
// short session keeps the join to a few seconds; a fresh group id makes fromBeginning apply.
const consumer = kafka.consumer({
  groupId: `rlaif-node-${process.pid}-${Date.now()}`,
  sessionTimeout: 6000,
  heartbeatInterval: 1000,
  allowAutoTopicCreation: false,
});

let seen = 0;
let finish;
const done = new Promise((settle) => {
  finish = settle;
});
const timer = setTimeout(() => {
  console.error(`timed out after reading ${seen} of ${expected} records`);
  finish(2);
}, Number(process.env.NODE_READER_TIMEOUT_MS ?? 25000));

await consumer.connect();
await consumer.subscribe({ topics: [topic], fromBeginning: true });
await consumer.run({
  eachMessage: async ({ partition, message }) => {
    let valid = false;
    let errors = null;
    try {
      valid = validate(JSON.parse(message.value.toString("utf8")));
      errors = valid ? null : validate.errors.map((e) => `${e.instancePath || "/"} ${e.message}`);
    } catch (err) {
      errors = [`not JSON: ${err.message}`];
    }
    console.log(JSON.stringify({ partition, offset: Number(message.offset), valid, errors }));
    seen += 1;
    if (seen >= expected) finish(0);
  },
});
const code = await done;
clearTimeout(timer);
await consumer.disconnect();
process.exit(code);

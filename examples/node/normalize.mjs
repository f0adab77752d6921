// normserve from Node.js: create a session, normalize one float32 batch in TRAIN mode, print the
// output and the running statistics, delete the session.
//
//   npm ci                                    # in examples/node
//   node normalize.mjs [TARGET]               # or NORMSERVE_TARGET=...; default 127.0.0.1:50051
//
// The contract is loaded from the repository's .proto at run time (no generated code). Tensors
// are raw little-endian bytes in row-major order; tests/e2e/test_other_languages.py runs this
// script against a real server and checks its numbers against torch.
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");
const target = process.argv[2] ?? process.env.NORMSERVE_TARGET ?? "127.0.0.1:50051";

const definition = protoLoader.loadSync("normserve/v1/normserve.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto: session_id, num_features, ...
  longs: String, // int64/uint64 (shape, version) as decimal strings: no silent rounding
  enums: String, // "MODE_TRAIN", not 1
});
const { Normalizer } = grpc.loadPackageDefinition(definition).normserve.v1;
const client = new Normalizer(target, grpc.credentials.createInsecure());

// Each unary call as a promise, with a deadline, so a missing server fails fast.
function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10_000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// float32 values <-> Tensor.data. Written with explicit little-endian accessors, so the bytes are
// right on any host (a Float32Array's own bytes follow the host's byte order).
function toTensor(values, shape) {
  const f32 = Float32Array.from(values);
  const data = Buffer.alloc(f32.length * 4);
  f32.forEach((v, i) => data.writeFloatLE(v, i * 4));
  return { dtype: "DTYPE_FLOAT32", shape, data };
}

function fromTensor(tensor) {
  if (tensor.dtype !== "DTYPE_FLOAT32") throw new Error(`expected float32, got ${tensor.dtype}`);
  const values = Array.from({ length: tensor.data.length / 4 }, (_, i) => tensor.data.readFloatLE(i * 4));
  const shape = tensor.shape.map(Number);
  // Nest rows for printing: [N, C] -> N arrays of C.
  return shape.length === 2
    ? Array.from({ length: shape[0] }, (_, n) => values.slice(n * shape[1], (n + 1) * shape[1]))
    : values;
}

const batch = [
  [0.5, -1.0, 2.0, 10.0],
  [1.5, 0.0, -2.0, 20.0],
  [4.0, 3.0, 1.0, -5.0],
];

async function main() {
  const { session } = await call("CreateSession", {
    // momentum 0.1 is torch's default; leaving it unset asks for a cumulative moving average.
    config: { num_features: 4, momentum: 0.1 },
  });
  const id = session.session_id;
  console.log(`session: ${JSON.stringify(id)}`);
  try {
    console.log(`input: ${JSON.stringify(batch)}`);
    const result = await call("Normalize", {
      session_id: id,
      mode: "MODE_TRAIN",
      input: toTensor(batch.flat(), [batch.length, batch[0].length]),
    });
    console.log(`output: ${JSON.stringify(fromTensor(result.output))}`);
    console.log(`batch mean: ${JSON.stringify(fromTensor(result.mean))}`);
    console.log(`batch var: ${JSON.stringify(fromTensor(result.var))}`);

    const { session: after } = await call("GetSession", { session_id: id });
    console.log(`running mean: ${JSON.stringify(fromTensor(after.running_mean))}`);
    console.log(`running var: ${JSON.stringify(fromTensor(after.running_var))}`);
    console.log(`version: ${after.version}, num_batches_tracked: ${after.num_batches_tracked}`);
  } finally {
    await call("DeleteSession", { session_id: id });
    console.log(`deleted: ${JSON.stringify(id)}`);
  }
}

try {
  await main();
} catch (err) {
  // A gRPC error carries its status code and the server's message: show those, not a stack.
  const code = err.code === undefined ? "" : `${grpc.status[err.code]}: `;
  console.error(`normalize.mjs: ${code}${err.details ?? err.message}`);
  process.exitCode = 1;
} finally {
  client.close();
}

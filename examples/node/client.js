// A hnd.v1.SplitInference client in Node.js, from the .proto files alone (docs/PROTOCOL.md).
//
//   node client.js HOST:PORT BOTTLENECK.f32 HEIGHT WIDTH
//
// BOTTLENECK.f32 holds a head's output for one frame of HEIGHT x WIDTH pixels as raw little-endian
// float32 values, [1, C, h, w] in C order. The client asks the server what it runs (GetModelInfo),
// derives the resized, padded and bottleneck sizes from the protocol's rules, sends the tensor
// losslessly (32 bits, no compression) and prints one JSON line: the model info it used, the
// detections and the server's timings. Then it sends the same tensor with a wrong padded size and
// reports the server's refusal of a request padded to the image size instead of a multiple of 32 (code
// and message), to show what a client sees when it gets a rule wrong.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

// The shipped tree: proto/ is the include root, files import each other as "hnd/v1/<name>.proto".
const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function loadService() {
  const definition = protoLoader.loadSync("hnd/v1/split_inference.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (snake_case)
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).hnd.v1.SplitInference;
}

// torchvision's resize: scale = min(min_size / short, max_size / long), each side floored.
function resizedSize(height, width, minSize, maxSize) {
  const scale = Math.min(minSize / Math.min(height, width), maxSize / Math.max(height, width));
  return [Math.floor(height * scale), Math.floor(width * scale)];
}

const roundUp = (value, multiple) => Math.ceil(value / multiple) * multiple;

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 60_000);
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function inferRequest(info, data, original, image, padded, channels) {
  const [hp, wp] = padded;
  const shape = [1, channels, Math.floor(hp / 4) + 4, Math.floor(wp / 4) + 4]; // stem: / 4; encoder: + 4
  return {
    request_id: "node-1",
    weights_fingerprint: info.weights_fingerprint,
    bottleneck: {
      tensor: {
        shape,
        dtype: "DTYPE_FLOAT32",
        bits: 32, // lossless float32: no scale / zero point; granularity may stay unset
        compression: "COMPRESSION_NONE",
        raw_size: data.length,
        data,
      },
      meta: {
        original_sizes: [{ height: original[0], width: original[1] }],
        image_sizes: [{ height: image[0], width: image[1] }],
        padded_size: { height: hp, width: wp },
      },
    },
  };
}

async function main() {
  const [target, file, height, width] = process.argv.slice(2);
  if (!target || !file || !height || !width) {
    console.error("usage: node client.js HOST:PORT BOTTLENECK.f32 HEIGHT WIDTH");
    process.exit(2);
  }
  const SplitInference = loadService();
  const client = new SplitInference(target, grpc.credentials.createInsecure());
  const info = await call(client, "GetModelInfo", {});
  const original = [Number(height), Number(width)];
  const image = resizedSize(original[0], original[1], info.min_size, info.max_size);
  const divisible = info.limits.size_divisible || 32;
  const padded = [roundUp(image[0], divisible), roundUp(image[1], divisible)];
  const data = fs.readFileSync(file);
  const channels = info.bottleneck_channels;
  const expected = channels * (padded[0] / 4 + 4) * (padded[1] / 4 + 4) * 4;
  if (data.length !== expected) {
    throw new Error(`${file}: ${data.length} bytes, expected ${expected} for padded ${padded.join("x")}`);
  }
  const response = await call(client, "Infer", inferRequest(info, data, original, image, padded, channels));
  // A client that forgets to round the padded size up to size_divisible: refused before any work.
  let refusal = null;
  try {
    const unpadded = Buffer.alloc(channels * (Math.floor(image[0] / 4) + 4) * (Math.floor(image[1] / 4) + 4) * 4);
    await call(client, "Infer", inferRequest(info, unpadded, original, image, image, channels));
  } catch (error) {
    refusal = { code: grpc.status[error.code], details: error.details };
  }
  const detections = response.detections.map((d) => ({ boxes: d.boxes, labels: d.labels, scores: d.scores }));
  console.log(JSON.stringify({
    model_kind: info.model_kind,
    image_size: image,
    padded_size: padded,
    request_id: response.request_id,
    detections,
    timings: response.timings,
    refusal,
  }));
  client.close();
}

main().catch((error) => {
  console.error(`client.js: ${error.details || error.message}`);
  process.exit(1);
});

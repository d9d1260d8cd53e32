// Serves the harness's synchronous file reads: the main thread blocks on a
// shared flag while this worker asks the runner (fetch an asset, or the
// asset manifest) and waits for its answer.
// flag[0]: 0 = pending, 1 = done, 2 = failed.
//
// On its own control connection it sends the harness's calls and reads their
// answers (the full list of messages is at the top of harness.js):
//   { op: "materialize", id, path }    { op: "tree", id }     (`id` added here)
//   { op: "answer", id, ok, error }    `error` only when !ok

const encoder = new TextEncoder();
const decoder = new TextDecoder();
let connection = null;
let nextId = 1;
const pending = new Map();

async function readReplies() {
  let buffered = "";
  const chunk = new Uint8Array(16 * 1024);
  while (true) {
    const n = await connection.read(chunk).catch(() => null);
    if (n === null) break;
    buffered += decoder.decode(chunk.subarray(0, n), { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const reply = JSON.parse(buffered.slice(0, newline));
      buffered = buffered.slice(newline + 1);
      const flag = pending.get(reply.id);
      pending.delete(reply.id);
      if (flag) {
        Atomics.store(flag, 0, reply.ok ? 1 : 2);
        Atomics.notify(flag, 0);
      }
    }
  }
  for (const flag of pending.values()) {
    Atomics.store(flag, 0, 2);
    Atomics.notify(flag, 0);
  }
}

self.onmessage = async ({ data }) => {
  if (data.controlPath) {
    connection = await Deno.connect({ transport: "unix", path: data.controlPath });
    readReplies();
    return;
  }
  while (!connection) await new Promise((r) => setTimeout(r, 1));
  const id = nextId++;
  pending.set(id, data.flag);
  const line = encoder.encode(JSON.stringify({ ...data.message, id }) + "\n");
  let written = 0;
  while (written < line.length) written += await connection.write(line.subarray(written));
};

// A subhoster's relay, shaped like Deno's example relay for Subhosting v1:
// it picks the deployment from the Host's first label, signs an
// `x-deno-subhost` JWT with `jose` (HS256, a `kid`, `iat`, a 15-minute `exp`,
// an `rpc_root` claim) and forwards the request — every header, the body
// streamed — to the runner, streaming the answer back.
//
//   deno run --allow-net --allow-env --node-modules-dir=manual tools/e2e/relay.mjs
//
// Environment: RUNNER_URL (http://127.0.0.1:PORT), SUBHOST_KID,
// SUBHOST_SECRET, RPC_ROOT (absolute, ending in `/`). Listens on loopback on
// a free port and prints `relay listening on <port>` once it does.

import { SignJWT } from "jose";

const runner = new URL(Deno.env.get("RUNNER_URL"));
const kid = Deno.env.get("SUBHOST_KID");
const secret = new TextEncoder().encode(Deno.env.get("SUBHOST_SECRET"));
const rpcRoot = Deno.env.get("RPC_ROOT");

Deno.serve({
  hostname: "127.0.0.1",
  port: 0,
  onListen({ port }) {
    console.log(`relay listening on ${port}`);
  },
}, async (request) => {
  const url = new URL(request.url);
  const host = request.headers.get("host") ?? "";
  const deploymentId = host.split(".")[0];
  const jwt = await new SignJWT({ deployment_id: deploymentId, rpc_root: rpcRoot })
    .setProtectedHeader({ alg: "HS256", kid })
    .setIssuedAt()
    .setExpirationTime("15m")
    .sign(secret);
  const headers = new Headers(request.headers);
  headers.set("x-deno-subhost", jwt);
  return await fetch(new URL(url.pathname + url.search, runner), {
    method: request.method,
    headers,
    body: request.body,
    redirect: "manual",
  });
});

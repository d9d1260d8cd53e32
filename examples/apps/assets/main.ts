// `export default { fetch }` (the `deno serve` form), reading its own files.
export default {
  async fetch(request: Request): Promise<Response> {
    const url = new URL(request.url);
    if (url.pathname === "/") {
      const names = [];
      for await (const entry of Deno.readDir("static")) names.push(entry.name);
      return Response.json({ files: names.sort(), greeting: Deno.env.get("GREETING") ?? null });
    }
    try {
      const body = await Deno.readFile(`static${url.pathname}`);
      return new Response(body);
    } catch {
      return new Response("not found\n", { status: 404 });
    }
  },
};

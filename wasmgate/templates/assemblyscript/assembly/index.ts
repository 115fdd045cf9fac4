// {{name}}: a wasmgate filter in AssemblyScript, on Solo.io's Proxy-Wasm SDK (@solo-io/proxy-runtime).
//
// config: plain text, the greeting (default "hello"); the gateway passes a string `config:` as is.
// Every request gets `x-greeting: <greeting>` on its way upstream; a request with an `x-block`
// header is refused with 403. The SDK picks its root context by the filter entry's `root_id`,
// which must be "{{lib}}" (the name given to registerRootContext below).
export * from "@solo-io/proxy-runtime/proxy"; // the proxy_on_* exports the host calls
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, HeaderPair, LogLevelValues, log,
} from "@solo-io/proxy-runtime";

// The root context: one per filter entry; reads the configuration.
class Root extends RootContext {
  greeting: string = "hello";

  onConfigure(configuration_size: u32): bool {
    // The SDK's onConfigure reads the configuration into getConfiguration(); it traps on an
    // empty one (no `config:` in the filter entry), so keep the default then.
    if (configuration_size == 0) return true;
    super.onConfigure(configuration_size);
    const text = this.getConfiguration().trim();
    if (text.indexOf("\n") >= 0) {
      log(LogLevelValues.error, "{{name}}: bad configuration: the greeting must be one line");
      return false; // the gateway refuses to load the filter
    }
    if (text.length > 0) this.greeting = text;
    return true;
  }

  createContext(context_id: u32): Context {
    return new Stream(context_id, this);
  }
}

// The HTTP context: one per request.
class Stream extends Context {
  greeting: string;

  constructor(context_id: u32, root: Root) {
    super(context_id, root);
    this.greeting = root.greeting;
  }

  onRequestHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (stream_context.headers.request.get("x-block").length > 0) {
      const extra: Array<HeaderPair> = [
        new HeaderPair(String.UTF8.encode("content-type"), String.UTF8.encode("text/plain")),
      ];
      send_local_response(403, "blocked", String.UTF8.encode("blocked\n"), extra,
                          GrpcStatusValues.InvalidCode); // -1: a plain HTTP reply
      return FilterHeadersStatusValues.StopIteration;
    }
    stream_context.headers.request.replace("x-greeting", this.greeting);
    log(LogLevelValues.info, "{{name}}: greeted " + stream_context.headers.request.get(":path"));
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new Root(context_id); }, "{{lib}}");

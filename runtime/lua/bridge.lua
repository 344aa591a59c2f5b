-- The Lua half of the async bridge. Runs once per LuaRuntime with the full standard library,
-- keeps it private, and hands Python a small table of entry points.
--
-- Each delivery runs as a coroutine. Host calls that must wait (publish, info, sleep, settle)
-- yield a request tagged with REQ; Python awaits the work and resumes the coroutine with the
-- answer. Coroutines never leave Lua: Python refers to them by integer id.
--
-- Handlers cannot reach one another, nor stop the worker, because:
-- * handler code (its functions and its metamethods) runs only inside an invocation's
--   coroutines, under that invocation's budget; everywhere else the bridge reads handler values
--   with raw access (rawequal, rawget, next) and hands Python plain values only;
-- * no table a handler can change is used by another function (shared ones are out of reach);
-- * a coroutine serves one invocation: a handler can only touch the coroutines it created in the
--   invocation that is running, and runners go back to the pool only when their handler is done.

local host, budget, step_size, keepalive_every, bounded_source, margin = ...

local co_create, co_resume, co_yield = coroutine.create, coroutine.resume, coroutine.yield
local co_status, co_running, co_close = coroutine.status, coroutine.running, coroutine.close
local sethook, raw_getmetatable = debug.sethook, debug.getmetatable
local raw_load, select, type, pairs, next = load, select, type, pairs, next
local setmetatable, getmetatable, tostring, pcall = setmetatable, getmetatable, tostring, pcall
local rawget, rawequal, rawlen, error = rawget, rawequal, rawlen, error
local math_type, math_floor = math.type, math.floor
local utf8_len, string_gsub, string_sub = utf8.len, string.gsub, string.sub
local collectgarbage = collectgarbage

-- bounded.lua, compiled without line information (see there)
local bound_library = raw_load(string.dump(assert(raw_load(bounded_source, "=bounded")), true),
  "=bounded", "b")()

-- Sandboxes reach string methods through the string metatable: take `dump` away from it and
-- lock the metatable so no handler can change what `("x"):upper()` means for the others.
string.dump = nil
getmetatable("").__metatable = false
-- Nothing but this file needs `debug`; lupa would also look up debug.traceback on every call
-- from Python and build a traceback for every error.
debug = nil

-- Markers of what a runner yields are private functions: `==` never calls a metamethod to
-- compare a function, so no handler value can pass for one (nor can a handler reach them).
local REQ = function() end
-- What an invocation step returns to Python: ACK or NACK alone (the common case, no tuple),
-- FAIL, kind, message, or CALL, op, args... for a host request.
local ACK, NACK, FAIL, CALL = 0, 1, 2, 3
local MAX_TEXT = 8192 -- bytes of an error or log message that leave Lua; the rest is cut
local LOAD = 16 -- instructions charged per byte load compiles: about what compiling costs

local array_mt = { __metatable = false, __name = "luaq.array" }
local contexts = setmetatable({}, { __mode = "k" }) -- coroutine -> invocation context
local invocations = {} -- invocation id -> coroutine waiting for a host answer

------------------------------------------------------------------------------------------------
-- errors

local KINDS = {
  "INVALID", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAVAILABLE", "INTERNAL",
  "CANCELED", "CONFLICT", "TIMEOUT", "RATE_LIMITED", "UNKNOWN",
}
local KIND = {}
for _, kind in ipairs(KINDS) do KIND[kind] = true end

-- Every sandbox's errors share this metatable, so no handler may reach it: `__metatable` hides
-- it from getmetatable, and `__index` is a table of methods that does not lead back to it.
local methods = {}
function methods.kind(self) return self._kind end
function methods.message(self) return self._message end
function methods.retryable(self) return self._retryable end
function methods.details(self) return self._details end
local Error = { __metatable = false, __name = "luaq.error", __index = methods }
function Error.__tostring(self) return self._message end

local function new_error(kind, message, retryable, details)
  return setmetatable({
    _kind = kind or "UNKNOWN",
    _message = tostring(message),
    _retryable = retryable == true,
    _details = details,
  }, Error)
end

local function is_error(value) return rawequal(raw_getmetatable(value), Error) end

-- Text that crosses into Python: at most MAX_TEXT bytes (a log line or an error header must stay
-- small whatever the handler made), in UTF-8, other bytes shown as \xNN.
local function printable(text)
  if #text > MAX_TEXT then
    text = string_sub(text, 1, MAX_TEXT) .. "... (" .. (#text - MAX_TEXT) .. " more bytes)"
  end
  if utf8_len(text) then return text end
  return (string_gsub(text, "[\128-\255]", function(c) return ("\\x%02X"):format(c:byte()) end))
end

-- The kind and text of whatever a handler failed with: an error object, a string, anything.
-- Reads raw and runs no handler code, so the bridge may use it outside an invocation.
local function describe(value)
  if is_error(value) then
    local kind, message = rawget(value, "_kind"), rawget(value, "_message")
    return KIND[kind] and kind or "UNKNOWN", -- (a kind of the handler's own: UNKNOWN)
      type(message) == "string" and printable(message) or "(no message)"
  end
  local t = type(value)
  if t == "string" then return "UNKNOWN", printable(value) end
  if t == "table" or t == "userdata" then return "UNKNOWN", t end -- __tostring is handler code
  return "UNKNOWN", tostring(value)
end

-- describe, and the value's own __tostring for other tables: only inside an invocation.
local function explain(value)
  local t = type(value)
  if (t == "table" or t == "userdata") and not is_error(value) then
    local ok, text = pcall(tostring, value)
    if ok and type(text) == "string" then return "UNKNOWN", printable(text) end
  end
  return describe(value)
end

local explain_for -- explain(value), run in a new coroutine of the invocation `ctx`

-- lupa makes the references Python takes to Lua values (a table handed to a helper or in a host
-- request, the handler a module defines) outside Lua's protected mode, where an allocation that
-- fails would cross Python's frames (a deadlock) or abort the process. So Lua hands Python such
-- a value only with `margin` KiB in use or fewer (MEMORY_MARGIN of the limit to spare, which
-- Python keeps for what it hands back: runtime.py), after a full collection if need be: full()
-- says it has not, and room_for(value) fails with "not enough memory" then.
local function full()
  if collectgarbage("count") <= margin then return false end
  collectgarbage()
  return collectgarbage("count") > margin
end

local function room_for(value) -- (hot: one call to collectgarbage when there is room)
  if value ~= nil and collectgarbage("count") > margin and full() then
    error("not enough memory", 0)
  end
end

-- Calls a Python helper. A Python exception must never reach a sandbox (it would arrive as a
-- userdata with lupa's metatable), so failures come back as (false, nil, message).
local function call_python(fn, ...)
  local ok, a, b, c, d = pcall(fn, ...)
  if ok then return a, b, c, d end
  local _, text = explain(a)
  return false, nil, "internal error: " .. text
end

local function errors_module()
  local errors = {}
  for _, kind in ipairs(KINDS) do errors[kind] = kind end
  function errors.new(spec)
    if type(spec) == "table" and not is_error(spec) then
      return new_error(spec.kind, spec.message or "", spec.retryable, spec.details)
    end
    return new_error("UNKNOWN", spec, false, nil)
  end
  function errors.wrap(err, message)
    local kind, text = explain(err)
    local retryable = is_error(err) and err._retryable or false
    local details = is_error(err) and err._details or nil
    local wrapped = new_error(kind, tostring(message) .. ": " .. text, retryable, details)
    wrapped._cause = err
    return wrapped
  end
  function errors.is(err, kind)
    return is_error(err) and err._kind == kind
  end
  return errors
end

------------------------------------------------------------------------------------------------
-- instruction budget
--
-- One budget per invocation, shared by the coroutines the handler creates. Each coroutine's
-- count hook fires every `step_size` instructions and charges the invocation; a new coroutine
-- is charged a full step up front, so work spread over many short coroutines is never free.

local function exhausted()
  -- from now on every instruction fails, so `pcall` in a loop cannot swallow the stop
  error(contexts[co_running()].timeout, 0)
end

local function charge(ctx, instructions)
  local used = ctx.used + instructions
  ctx.used = used
  if used > budget then
    -- an error object per invocation: one a handler catches and changes is its own
    ctx.timeout = ctx.timeout or new_error("TIMEOUT", "instruction budget of " .. budget ..
      " exceeded")
    sethook(exhausted, "", 1)
    error(ctx.timeout, 0)
  end
end

-- Every `keepalive_every` steps of any handler, Python gets a word in: a handler that computes
-- for seconds keeps the event loop, and with it the broker's heartbeats, from running.
local ticks = 0

local function tick()
  charge(contexts[co_running()], step_size)
  ticks = ticks + 1
  if ticks >= keepalive_every then
    ticks = 0
    pcall(host.keepalive) -- (no Lua value crosses; it raises nothing: runtime.py)
  end
end

local function new_coroutine(fn, ctx)
  local co = co_create(fn)
  contexts[co] = ctx
  sethook(co, tick, "", step_size)
  return co
end

function explain_for(ctx, value)
  local t = type(value)
  if (t ~= "table" and t ~= "userdata") or is_error(value) then return describe(value) end
  local co = new_coroutine(explain, ctx)
  local ok, kind, text = co_resume(co, value)
  if not ok then return describe(kind) end -- what stopped it: the budget, memory
  if co_status(co) == "dead" then return kind, text end
  return "UNKNOWN", "a " .. t .. " whose __tostring yields" -- (and its requests are dropped)
end

------------------------------------------------------------------------------------------------
-- host calls

local function current()
  return contexts[co_running()]
end

-- What is left of the running invocation's budget, and charging work done outside Lua's VM
-- (in Python, in C functions) to it.
local function remaining()
  local ctx = current()
  return ctx and budget - ctx.used or 0
end

local function spend(instructions)
  local ctx = current()
  if ctx and instructions then charge(ctx, math_floor(instructions)) end
end

-- A handler's text that C scans (utf8.len) and lupa copies for Python: one instruction per 8
-- bytes, when that is worth a charge
local function scanned(text)
  if #text >= 512 then spend(#text / 8) end
end

-- What sandboxes get of `string`, `table`, `utf8` and os.date: the C functions a single call of
-- which could run unbounded (string.rep of empty strings, table.move over nils, backtracking
-- patterns, string.pack of a huge size...) are replaced by versions that charge their work
-- (bounded.lua). Strings' methods too.
local bounded_string, bounded_table, bounded_utf8, bounded_date =
  bound_library(spend, remaining, raw_getmetatable)
raw_getmetatable("").__index = bounded_string

local function unavailable(what)
  return nil, "INVALID", what .. " is not available while the module loads", false
end

local function call_host(what, op, ...)
  -- yields to the scheduler; nil + error when there is no invocation to wait in
  local ctx = current()
  if ctx == nil or ctx.loading then return unavailable(what) end
  return co_yield(REQ, op, ...)
end

local function answer(ok, kind, message, retryable)
  if ok then return ok end
  return nil, new_error(kind, message, retryable)
end

-- Checks done in Lua so bad calls fail without a round trip to Python.
local function check_headers(headers)
  if headers == nil then return nil end
  if type(headers) ~= "table" then return "headers must be a table" end
  for key, value in next, headers do
    if type(key) ~= "string" then return "header names must be strings" end
    local t = type(value)
    if t ~= "string" and t ~= "number" and t ~= "boolean" then
      return "header " .. printable(key) .. " must be a string, number or boolean, not " .. t
    end
  end
  return nil
end

local NOT_UTF8 = "is not valid UTF-8 text"

local function queue_module(ns)
  local queue = {}

  function queue.publish(queue_id, data, headers)
    if type(queue_id) ~= "string" or queue_id == "" then
      return nil, new_error("INVALID", "queue id is empty", false)
    end
    if data == nil or data == "" then
      return nil, new_error("INVALID", "message data is empty", false)
    end
    scanned(queue_id)
    if type(data) == "string" then scanned(data) end
    if not utf8_len(queue_id) then
      return nil, new_error("INVALID", "queue id " .. NOT_UTF8, false)
    end
    if type(data) == "string" and not utf8_len(data) then
      return nil, new_error("INVALID", "message data " .. NOT_UTF8, false)
    end
    local problem = check_headers(headers)
    if problem then return nil, new_error("INVALID", problem, false) end
    local ctx = current()
    if ctx == nil or ctx.loading then return answer(unavailable("queue.publish")) end
    room_for(data)
    room_for(headers)
    -- Python reads the data within what is left of the budget, and says what that cost
    local ok, cost, kind, message, retryable =
      co_yield(REQ, "publish", ns, queue_id, data, headers, budget - ctx.used)
    charge(ctx, cost)
    return answer(ok, kind, message, retryable)
  end

  function queue.info(queue_id)
    if type(queue_id) ~= "string" or queue_id == "" then
      return nil, new_error("INVALID", "queue id is empty", false)
    end
    scanned(queue_id)
    if not utf8_len(queue_id) then
      return nil, new_error("INVALID", "queue id " .. NOT_UTF8, false)
    end
    local messages, consumers_or_kind, message, retryable =
      call_host("queue.info", "info", ns, queue_id)
    if messages == nil then return answer(nil, consumers_or_kind, message, retryable) end
    return { message_count = messages, consumer_count = consumers_or_kind }
  end

  function queue.message()
    local ctx = current()
    if ctx == nil or ctx.loading then
      return nil, new_error("INVALID", "no delivery context: queue.message() works only " ..
        "while a consumer handles a message", false)
    end
    local msg = ctx.msg
    if msg then return msg end
    msg = {}
    -- methods accept both msg:id() and msg.id(): the first argument is skipped when it is msg
    local function arg(self, value)
      if rawequal(self, msg) then return value end
      return self
    end
    local headers = ctx.headers or {}
    function msg.id() return ctx.id end
    function msg.header(self, key) return headers[arg(self, key)] end
    function msg.headers()
      local copy = {}
      for k, v in pairs(headers) do copy[k] = v end
      return copy
    end
    local function settle(action)
      -- a Message kept past its invocation, or handed to another one, settles nothing
      if ctx.settled or current() ~= ctx then return false end
      ctx.settled = true
      return answer(call_host("msg:" .. action .. "()", "settle", action))
    end
    function msg.ack() return settle("ack") end
    function msg.nack() return settle("nack") end
    ctx.msg = msg
    return msg
  end

  return queue
end

local function logger_module(ns)
  local logger = {}
  for _, level in ipairs({ "debug", "info", "warn", "error" }) do
    logger[level] = function(self, message, fields)
      if not rawequal(self, logger) then message, fields = self, message end
      local ctx = current()
      local consumer, message_id
      if ctx ~= nil and not ctx.loading then consumer, message_id = ctx.consumer, ctx.id end
      local _, text = explain(message)
      if type(fields) ~= "table" then fields = nil end
      room_for(fields)
      spend(call_python(host.log, level, text, fields, ns, consumer, message_id, remaining())
        or nil)
    end
  end
  return logger
end

-- What a helper that returns (ok, value, message, cost) gives its caller.
local function result(ok, value, message, cost)
  spend(cost)
  if ok then return value end
  -- no message: Python could not hand the result over within --lua-max-memory
  if message == nil then error("not enough memory", 0) end
  return nil, new_error("INVALID", message, false)
end

local function json_module()
  local json = {}
  function json.encode(value)
    if type(value) == "string" then
      scanned(value)
      if not utf8_len(value) then
        return nil, new_error("INVALID", "json.encode: the string " .. NOT_UTF8, false)
      end
    end
    room_for(value)
    return result(call_python(host.json_encode, value, remaining()))
  end
  function json.decode(text)
    if type(text) ~= "string" then
      return nil, new_error("INVALID", "json.decode expects a string", false)
    end
    scanned(text)
    if not utf8_len(text) then
      return nil, new_error("INVALID", "json.decode: the text " .. NOT_UTF8, false)
    end
    return result(call_python(host.json_decode, text, remaining()))
  end
  return json
end

local function time_module()
  local time = {}
  function time.sleep(seconds)
    if type(seconds) ~= "number" or not (seconds >= 0) then -- (NaN is not >= 0)
      return nil, new_error("INVALID", "time.sleep expects a number of seconds >= 0", false)
    end
    return answer(call_host("time.sleep", "sleep", seconds))
  end
  function time.now() return (call_python(host.now)) end
  return time
end

-- Handlers' own metrics, exported as luaq_user_<name> (README: "Metrics and health"). The
-- name and value are checked here, so that only a string, a number and a table (read raw)
-- reach Python.
local function metrics_module()
  local metrics = {}
  local function record(kind, name, labels, value)
    if type(name) ~= "string" then
      return nil, new_error("INVALID", "metric name must be a string", false)
    end
    scanned(name)
    if type(value) ~= "number" then
      return nil, new_error("INVALID", "metric " .. printable(name) .. ": value must be a number",
        false)
    end
    if labels ~= nil and type(labels) ~= "table" then
      return nil, new_error("INVALID", "metric " .. printable(name) .. ": labels must be a table",
        false)
    end
    room_for(labels)
    return result(call_python(host.metric, kind, name, labels, value, remaining()))
  end
  function metrics.counter(name, labels, n)
    if n == nil then n = 1 end
    return record("counter", name, labels, n)
  end
  function metrics.gauge(name, labels, value) return record("gauge", name, labels, value) end
  function metrics.histogram(name, labels, value)
    return record("histogram", name, labels, value)
  end
  return metrics
end

local MODULES = {
  queue = queue_module, logger = logger_module, json = json_module, time = time_module,
  metrics = metrics_module,
}

------------------------------------------------------------------------------------------------
-- sandbox

local function copy(t, without)
  local out = {}
  for k, v in pairs(t) do
    if not (without and without[k]) then out[k] = v end
  end
  return out
end

-- coroutine functions for handlers: host requests made inside a handler's own coroutines are
-- passed up to the scheduler, and the answer is passed back down.
local function sandbox_coroutine()
  local lib = copy(coroutine)
  local function forward(co, ok, first, ...)
    if ok and first == REQ then
      return forward(co, co_resume(co, co_yield(REQ, ...)))
    end
    return ok, first, ...
  end
  -- A coroutine serves the invocation that created it, and is charged to that budget: touching
  -- it from another would run its code, or show its data, there.
  local function own(co, name)
    local ctx = current()
    if type(co) == "thread" and (ctx == nil or not rawequal(contexts[co], ctx)) then
      error("coroutine." .. name .. ": the coroutine belongs to another invocation (a " ..
        "coroutine can only be used by the invocation that created it)", 3)
    end
    return co
  end
  function lib.create(fn)
    local ctx = current()
    charge(ctx, step_size)
    return new_coroutine(fn, ctx)
  end
  function lib.resume(co, ...) return forward(co, co_resume(own(co, "resume"), ...)) end
  function lib.status(co) return co_status(own(co, "status")) end
  function lib.close(co) return co_close(own(co, "close")) end
  function lib.wrap(fn)
    local co = lib.create(fn)
    return function(...)
      local function unwrap(ok, ...)
        if not ok then error((...), 0) end
        return ...
      end
      return unwrap(lib.resume(co, ...))
    end
  end
  return lib
end

local SAFE_GLOBALS = {
  "assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget", "rawlen", "rawset",
  "select", "getmetatable", "tonumber", "tostring", "type", "_VERSION",
}

-- Lua runs finalizers with hooks off, so a __gc metamethod would escape the budget. Lua only
-- honours __gc present when setmetatable is called, so checking here is enough.
local function sandbox_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not available to handlers", 2)
  end
  return setmetatable(t, mt)
end

-- A message handler of the real xpcall runs before the stack unwinds, which for an error
-- raised by the budget hook means with hooks off: run it after unwinding instead.
local function sandbox_xpcall(f, handler, ...)
  local function finish(ok, ...)
    if ok then return true, ... end
    return false, select(2, pcall(handler, (...)))
  end
  return finish(pcall(f, ...))
end

-- A random generator of a function's own (xoshiro256**, as Lua's math.random), seeded from the
-- operating system's randomness (host.seed), never from a generator another function draws from:
-- one function's numbers or seeds tell nothing of another's. Seeded again in each worker process
-- (bridge.reseed), which would otherwise draw the numbers of every process forked from one load.
local random_seed = host.seed
local reseeds = setmetatable({}, { __mode = "k" }) -- each function's, while its sandbox lives

local function random_generator()
  local s0, s1, s2, s3
  local function rotl(x, n) return (x << n) | (x >> (64 - n)) end
  local function next_integer()
    local result = rotl(s1 * 5, 7) * 9
    local t = s1 << 17
    s2 = s2 ~ s0
    s3 = s3 ~ s1
    s1 = s1 ~ s2
    s0 = s0 ~ s3
    s2 = s2 ~ t
    s3 = rotl(s3, 45)
    return result
  end
  local function seed(n1, n2)
    s0, s1, s2, s3 = n1, 0xff, n2, 0
    for _ = 1, 16 do next_integer() end
  end
  local function integer(x, position, name)
    return math.tointeger(x) or error(("bad argument #%d to '%s' (number has no integer "
      .. "representation)"):format(position, name), 3)
  end
  local chosen = false -- seeded by the function itself: its numbers are its to repeat
  local function randomseed(n1, n2)
    chosen = n1 ~= nil
    if n1 == nil then
      n1, n2 = random_seed(), random_seed()
    else
      n1, n2 = integer(n1, 1, "randomseed"), n2 == nil and 0 or integer(n2, 2, "randomseed")
    end
    seed(n1, n2)
    return n1, n2
  end
  local function random(m, n)
    local value = next_integer()
    if m == nil then return (value >> 11) * 0x1p-53 end
    local low, up
    if n == nil then
      low, up = 1, integer(m, 1, "random")
      if up == 0 then return value end -- an integer of 64 random bits
    else
      low, up = integer(m, 1, "random"), integer(n, 2, "random")
    end
    if low > up then
      error(("bad argument #%d to 'random' (interval is empty)"):format(n == nil and 1 or 2), 2)
    end
    local range = up - low + 1  -- 0 for the whole integer range; negative: over 2^63
    if range == 0 then return value end
    if range > 0 then return low + (value >> 1) % range end
    while not math.ult(value, range) do value = next_integer() end
    return low + value
  end
  local function reseed()
    if not chosen then seed(random_seed(), random_seed()) end
  end
  reseed()
  reseeds[random] = reseed
  return random, randomseed
end

local function sandbox(ns, modules)
  local env = {}
  for _, name in ipairs(SAFE_GLOBALS) do env[name] = _ENV[name] end
  env.setmetatable = sandbox_setmetatable
  env.xpcall = sandbox_xpcall
  env.string = copy(bounded_string)
  env.table = copy(bounded_table)
  env.math = copy(math)
  env.math.random, env.math.randomseed = random_generator()
  env.utf8 = copy(bounded_utf8)
  env.os = { time = os.time, clock = os.clock, date = bounded_date, difftime = os.difftime }
  env.coroutine = sandbox_coroutine()
  env.errors = errors_module()
  env._G = env
  function env.load(chunk, name, _, chunk_env)
    if type(chunk) ~= "string" then
      return nil, "load accepts only source text"
    end
    spend(LOAD * #chunk)
    return raw_load(chunk, name, "t", chunk_env or env)
  end
  local loaded = {}
  for _, name in ipairs(modules) do
    loaded[name] = MODULES[name](ns)
    env[name] = loaded[name]
  end
  function env.require(name)
    local module = loaded[name]
    if module == nil then
      error("module '" .. tostring(name) .. "' is not available to this function " ..
        "(list it under modules:)", 2)
    end
    return module
  end
  if loaded.logger then
    function env.print(...)
      local parts = table.pack(...)
      for i = 1, parts.n do parts[i] = tostring(parts[i]) end
      loaded.logger:info(table.concat(parts, "\t"))
    end
  end
  return env
end

------------------------------------------------------------------------------------------------
-- entry points for Python

local bridge = {}

-- Loads a function entry: compiles the source into its own sandbox, runs the chunk once (outside
-- any delivery) and returns the handler, or nil and a message.
function bridge.load(source, chunkname, ns, modules, method)
  local env = sandbox(ns, modules)
  local chunk, syntax = raw_load(source, chunkname, "t", env)
  if not chunk then return nil, syntax end
  local ctx = { loading = true, used = 0 }
  local co = new_coroutine(chunk, ctx)
  local ok, result = co_resume(co)
  if not ok then return nil, select(2, explain_for(ctx, result)) end
  if co_status(co) ~= "dead" then
    co_close(co)
    return nil, "the module yielded while loading"
  end
  -- raw reads: the environment's and the returned table's __index are handler code
  local handler = rawget(env, method)
  if type(result) == "table" and rawget(result, method) ~= nil then
    handler = rawget(result, method)
  end
  if type(handler) ~= "function" then
    return nil, "method " .. method .. " is not defined (a global function or a field of " ..
      "the table the source returns)"
  end
  if full() then return nil, "not enough memory" end -- (Python takes a reference to it)
  return handler, nil
end

-- Invocations run in runner coroutines that are parked and reused once their handler
-- returns: a coroutine is the biggest allocation of an invocation. Only a runner yields
-- FINISHED, once its handler has returned and nothing of it is left on the runner's stack. A
-- runner stopped any other way (an error, the budget, a yield of the handler's own) is dropped.
local FINISHED = function() end
local parked, parked_max = {}, 256

local function runner(handler, payload)
  while true do
    handler, payload = co_yield(FINISHED, handler(payload))
  end
end

local function verdict(ctx, first, ...)
  ctx.settled = true
  if first == false then return NACK end
  local err = ...
  if err ~= nil then return FAIL, explain_for(ctx, err) end
  return ACK
end

local function step(id, co, ok, first, ...)
  local ctx = contexts[co]
  if ok then
    if first == FINISHED then
      invocations[id] = nil
      contexts[co] = nil -- parked: it belongs to no invocation until reused
      if #parked < parked_max then parked[#parked + 1] = co end
      return verdict(ctx, ...)
    end
    if first == REQ then
      invocations[id] = co
      return CALL, ...
    end
    invocations[id] = nil
    ctx.settled = true
    co_close(co)
    return FAIL, "INVALID", "the handler yielded outside of a coroutine it created"
  end
  invocations[id] = nil
  ctx.settled = true
  return FAIL, explain_for(ctx, first)
end

-- Returns the function that starts invocations of one handler for one consumer:
-- start(id, payload, message_id, headers or nil) -> a step result (see ACK above).
function bridge.starter(handler, consumer)
  return function(id, payload, message_id, headers)
    local ctx = { id = message_id, headers = headers, consumer = consumer, used = 0 }
    local n = #parked
    local co = parked[n]
    if co then
      parked[n] = nil
      contexts[co] = ctx
      sethook(co, tick, "", step_size)
    else
      co = new_coroutine(runner, ctx)
    end
    return step(id, co, co_resume(co, handler, payload))
  end
end

function bridge.resume(id, ...)
  local co = invocations[id]
  return step(id, co, co_resume(co, ...))
end

-- Stops an invocation that will not be resumed (cancelled on shutdown), its budget exhausted
-- first: its to-be-closed variables' __close handlers each fail at their first instruction.
-- Given what was left of the budget, they would run, one invocation after another, past the
-- shutdown timeout.
function bridge.cancel(id)
  local co = invocations[id]
  invocations[id] = nil
  if not co then return end
  local ctx = contexts[co]
  ctx.timeout = ctx.timeout or new_error("CANCELED", "the invocation was stopped")
  sethook(co, exhausted, "", 1)
  co_close(co)
end

-- In a new worker process: every function's generator that it did not seed itself.
function bridge.reseed()
  for _, reseed in pairs(reseeds) do reseed() end
end

function bridge.array(t) return setmetatable(t, array_mt) end

-- How Python should read a table, and how many keys that took a look at (Python charges them):
-- "marked", its length for one marked as an array (none looked at); "array", n for one with
-- keys 1..n and no other (2n); "over", n for one of more than `most` keys; else "map", n.
-- Called from Python, outside any budget: raw access only, no metamethod runs.
function bridge.shape(t, most)
  if rawequal(raw_getmetatable(t), array_mt) then return "marked", rawlen(t) end
  local n = 0
  for key in next, t do
    if math_type(key) ~= "integer" or key < 1 then return "map", n + 1 end
    if n == most then return "over", n end
    n = n + 1
  end
  if n == 0 then return "map", 0 end
  for i = 1, n do
    if rawget(t, i) == nil then return "map", n + i end
  end
  return "array", n
end

bridge.ACK, bridge.NACK, bridge.FAIL, bridge.CALL = ACK, NACK, FAIL, CALL
return bridge

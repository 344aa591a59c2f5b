-- Bounded versions of the standard library's C functions a single call of which could run for
-- ever: Lua's count hook cannot stop C code, so such a call is paid for before it runs, or runs
-- on a Lua version of the function, whose every step the hook counts.
--
-- * string.rep costs one instruction per piece plus one per 8 bytes; empty pieces cost nothing
--   (C would loop over them, maybe 10^18 times, to build "").
-- * table.move and table.unpack cost one instruction per element, table.sort n * log2(n);
--   table.concat one per element plus one per 8 bytes it makes, string.format one per 8 bytes it
--   makes. table.insert, table.remove and table.sort on a table with a __len metamethod (handler
--   code, which may answer a length past any real element, and a different one each time C asks)
--   run in Lua; unpack and concat ask it once and hand C the range.
-- * Pattern matching (find, match, gmatch, gsub) runs in C only when its worst case is linear
--   and affordable: when every repetition (*, +, -) stands at the pattern's end, there is no
--   %b, no back-reference and at most 16 '?', the C matcher does at most (subject length + 1) *
--   (pattern length) * 2^(number of '?') steps, one instruction each, and the search runs in C
--   if that much is left of the budget. Any other pattern runs on a port of Lua's matcher to
--   Lua (lstrlib.c, step for step, errors included), so does a search that is not affordable.
--   gsub's replacement string costs its length per match.
-- * string.pack, string.unpack and string.packsize cost FORMAT instructions per byte of their
--   format (C reads it option by option; each may make a value); pack also one per byte of the
--   sizes the format names (c200000000 pads 200 MB with zeros), before it runs, and one per 8
--   bytes it makes. string.byte and utf8.codepoint cost one instruction per value they give,
--   string.char one per value it takes, utf8.char FORMAT per value; os.date DATE per byte of its
--   format (each conversion is a call to strftime).
--
-- Returns install(spend, remaining, raw_getmetatable) -> string, table, utf8, date: copies of
-- the library tables with the bounded functions in, and os.date bounded. spend(n) charges n
-- instructions to the running invocation and raises TIMEOUT past its budget; remaining() says
-- what is left of it. Loaded without line information, so that an error a C function raises
-- for a handler's arguments carries no position in this file.

local byte, char, sub, format = string.byte, string.char, string.sub, string.format
local c_find, c_gsub, c_gmatch = string.find, string.gsub, string.gmatch
local tointeger, ult = math.tointeger, math.ult
local max, min, log = math.max, math.min, math.log
local next, select, type, tostring, tonumber, error = next, select, type, tostring, tonumber, error
local rawget, rawlen, pcall = rawget, rawlen, pcall
local table_unpack, table_pack, table_concat = table.unpack, table.pack, table.concat

local ESC, CARET, DOLLAR, DOT = byte("%^$.", 1, 4)
local LPAREN, RPAREN, LBRACKET, RBRACKET = byte("()[]", 1, 4)
local STAR, PLUS, DASH, QUESTION = byte("*+-?", 1, 4)
local MAXCCALLS, MAXCAPTURES = 200, 32
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]" -- what makes C's find use the matcher
local WINDOW = 65536 -- steps of one C call of a plain search whose whole is not affordable
-- Work worth fewer instructions than this is not charged apart: less than the call to spend
-- would cost, and about what the bounded function's own instructions are counted.
local SMALL <const>, SMALL_TEXT <const> = 64, 512 -- (bytes of text worth SMALL instructions)
-- what C spends per byte of a pack format (or per character utf8.char makes), and per byte of a
-- date format, in instructions' time
local FORMAT <const>, DATE <const> = 16, 32

-- Character classes exactly as this process's C library sees them (its locale included): ask
-- the C matcher once per class and byte.
local CLASSES = {}
for letter in ("acdglpsuwx"):gmatch(".") do
  local class, negated = {}, {}
  for c = 0, 255 do
    class[c] = c_find(char(c), "%" .. letter) ~= nil
    negated[c] = not class[c]
  end
  CLASSES[byte(letter)], CLASSES[byte(letter:upper())] = class, negated
end

------------------------------------------------------------------------------------------------
-- Lua's matcher (lstrlib.c, 5.4), position for position; positions are 1-based and `p` indexes
-- the pattern. Reading past the end gives 0, as C reads the terminating NUL.

local function at(text, i) return byte(text, i) or 0 end

-- Errors of the matcher itself, marked apart from those of handler code it calls (a gsub
-- replacement function): reraise gives them the position C's would have, the caller's line.
local PORT = {}
local function fail(message) error({ [PORT] = message }, 0) end

-- A runtime error of this file's own code (comparing a handler's values in sort) is placed at
-- "?:-1: " (no line information): C's says nothing of where.
local NOWHERE = "?:-1: "

local function reraise(err, level) -- level: error()'s, seen from the caller of reraise
  if type(err) == "table" and rawget(err, PORT) ~= nil then error(rawget(err, PORT), level + 1) end
  if type(err) == "string" and sub(err, 1, #NOWHERE) == NOWHERE then
    error(sub(err, #NOWHERE + 1), 0)
  end
  error(err, 0)
end

-- `return rethrow(pcall(f, ...))` in a library function: f's errors as the function's own
local function rethrow(ok, ...)
  if ok then return ... end
  reraise((...), 2)
end

local function match_class(c, cl)
  local class = CLASSES[cl]
  if class then return class[c] end
  return cl == c
end

local function class_end(ms, p)
  local pat, c = ms.pat, at(ms.pat, p)
  p = p + 1
  if c == ESC then
    if p > ms.plen then fail("malformed pattern (ends with '%')") end
    return p + 1
  end
  if c == LBRACKET then
    if at(pat, p) == CARET then p = p + 1 end
    repeat -- look for a ']'
      if p > ms.plen then fail("malformed pattern (missing ']')") end
      c = at(pat, p)
      p = p + 1
      if c == ESC and p <= ms.plen then p = p + 1 end -- skip escapes (e.g. '%]')
    until at(pat, p) == RBRACKET
    return p + 1
  end
  return p
end

local function match_bracket_class(pat, c, p, ec)
  local sig = true
  if at(pat, p + 1) == CARET then
    sig = false
    p = p + 1
  end
  while true do
    p = p + 1
    if p >= ec then return not sig end
    local pc = at(pat, p)
    if pc == ESC then
      p = p + 1
      if match_class(c, at(pat, p)) then return sig end
    elseif at(pat, p + 1) == DASH and p + 2 < ec then
      p = p + 2
      if at(pat, p - 2) <= c and c <= at(pat, p) then return sig end
    elseif pc == c then
      return sig
    end
  end
end

local function single_match(ms, s, p, ep)
  if s > ms.slen then return false end
  local c, pc = byte(ms.src, s), at(ms.pat, p)
  if pc == DOT then return true end
  if pc == ESC then return match_class(c, at(ms.pat, p + 1)) end
  if pc == LBRACKET then return match_bracket_class(ms.pat, c, p, ep - 1) end
  return pc == c
end

local match -- match(ms, s, p): the position after the match of pattern[p..] at s, or nil

local function match_balance(ms, s, p)
  if p >= ms.plen then fail("malformed pattern (missing arguments to '%b')") end
  if at(ms.src, s) ~= at(ms.pat, p) or s > ms.slen then return nil end
  local b, e, cont = at(ms.pat, p), at(ms.pat, p + 1), 1
  for i = s + 1, ms.slen do
    local c = byte(ms.src, i)
    if c == e then
      cont = cont - 1
      if cont == 0 then return i + 1 end
    elseif c == b then
      cont = cont + 1
    end
  end
  return nil
end

local function max_expand(ms, s, p, ep)
  local i = 0
  while single_match(ms, s + i, p, ep) do i = i + 1 end
  while i >= 0 do -- try with the most repetitions first
    local res = match(ms, s + i, ep + 1)
    if res then return res end
    i = i - 1
  end
  return nil
end

local function min_expand(ms, s, p, ep)
  while true do
    local res = match(ms, s, ep + 1)
    if res then return res end
    if not single_match(ms, s, p, ep) then return nil end
    s = s + 1
  end
end

local function start_capture(ms, s, p, what)
  local level = ms.level + 1
  if level > MAXCAPTURES then fail("too many captures") end
  ms.init[level], ms.len[level], ms.level = s, what, level
  local res = match(ms, s, p)
  if not res then ms.level = ms.level - 1 end
  return res
end

local function end_capture(ms, s, p)
  local l = ms.level
  while l >= 1 and ms.len[l] ~= CAP_UNFINISHED do l = l - 1 end
  if l < 1 then fail("invalid pattern capture") end
  ms.len[l] = s - ms.init[l]
  local res = match(ms, s, p)
  if not res then ms.len[l] = CAP_UNFINISHED end
  return res
end

local function match_capture(ms, s, digit)
  local l = digit - byte("0")
  if l < 1 or l > ms.level or ms.len[l] == CAP_UNFINISHED then
    fail("invalid capture index %" .. l)
  end
  local len, init = ms.len[l], ms.init[l]
  if len >= 0 and ms.slen - s + 1 >= len and sub(ms.src, init, init + len - 1) ==
      sub(ms.src, s, s + len - 1) then
    return s + len
  end
  return nil
end

function match(ms, s, p)
  if ms.depth == 0 then fail("pattern too complex") end
  ms.depth = ms.depth - 1
  local pat, plen = ms.pat, ms.plen
  while p <= plen do
    local pc, default = at(pat, p), false
    if pc == LPAREN then
      if at(pat, p + 1) == RPAREN then
        s = start_capture(ms, s, p + 2, CAP_POSITION)
      else
        s = start_capture(ms, s, p + 1, CAP_UNFINISHED)
      end
      break
    elseif pc == RPAREN then
      s = end_capture(ms, s, p + 1)
      break
    elseif pc == DOLLAR and p == plen then
      if s ~= ms.slen + 1 then s = nil end
      break
    elseif pc == ESC and at(pat, p + 1) == byte("b") then
      s = match_balance(ms, s, p + 2)
      if not s then break end
      p = p + 4
    elseif pc == ESC and at(pat, p + 1) == byte("f") then
      p = p + 2
      if at(pat, p) ~= LBRACKET then fail("missing '[' after '%f' in pattern") end
      local ep = class_end(ms, p)
      local previous = s == 1 and 0 or at(ms.src, s - 1)
      if match_bracket_class(pat, previous, p, ep - 1) or
          not match_bracket_class(pat, at(ms.src, s), p, ep - 1) then
        s = nil
        break
      end
      p = ep
    elseif pc == ESC and at(pat, p + 1) >= byte("0") and at(pat, p + 1) <= byte("9") then
      s = match_capture(ms, s, at(pat, p + 1))
      if not s then break end
      p = p + 2
    else
      default = true
    end
    if default then -- a single-character class and its optional suffix
      local ep = class_end(ms, p)
      local suffix = at(pat, ep)
      if not single_match(ms, s, p, ep) then
        if suffix ~= STAR and suffix ~= QUESTION and suffix ~= DASH then
          s = nil
          break
        end
        p = ep + 1 -- accept empty
      elseif suffix == QUESTION then
        local res = match(ms, s + 1, ep + 1)
        if res then
          s = res
          break
        end
        p = ep + 1
      elseif suffix == PLUS then
        s = max_expand(ms, s + 1, p, ep)
        break
      elseif suffix == STAR then
        s = max_expand(ms, s, p, ep)
        break
      elseif suffix == DASH then
        s = min_expand(ms, s, p, ep)
        break
      else
        s, p = s + 1, ep
      end
    end
  end
  ms.depth = ms.depth + 1
  return s
end

local function capture(ms, i, s, e)
  if i > ms.level then
    if i ~= 1 then fail("invalid capture index %" .. i) end
    return sub(ms.src, s, e - 1)
  end
  local len, init = ms.len[i], ms.init[i]
  if len == CAP_UNFINISHED then fail("unfinished capture") end
  if len == CAP_POSITION then return init end
  return sub(ms.src, init, init + len - 1)
end

local function captures(ms, s, e)
  local n = (ms.level == 0 and s) and 1 or ms.level
  local values = {}
  for i = 1, n do values[i] = capture(ms, i, s, e) end
  return table_unpack(values, 1, n)
end

-- The first match at or after init (the loop of C's str_find_aux): its start, the position
-- after it, and the match state to read captures from; or nil.
local function lua_search(src, pat, init)
  local anchor = at(pat, 1) == CARET
  local ms = {
    src = src, slen = #src, pat = pat, plen = #pat, level = 0, depth = MAXCCALLS,
    init = {}, len = {},
  }
  local p = anchor and 2 or 1
  local s1 = init
  while true do
    ms.level = 0
    local e = match(ms, s1, p)
    if e then return s1, e, ms end
    if s1 > ms.slen or anchor then return nil end
    s1 = s1 + 1
  end
end

local function lua_find(src, pat, init)
  local a, e, ms = lua_search(src, pat, init)
  if a then return a, e - 1, captures(ms, nil, 0) end
  return nil
end

------------------------------------------------------------------------------------------------
-- which matcher runs a search

-- The cost of a pattern per start position when its worst case is linear (see the header), or
-- false. Anything that could make C raise (a malformed pattern, unbalanced captures, too many
-- of them) is not: the Lua matcher raises those, at the right line.
local function analyse(pat)
  local i, plen, optional, open, captures_made = 1, #pat, 0, 0, 0
  if plen > 128 then return false end -- so C's recursion limit (200 levels) is out of reach
  if at(pat, 1) == CARET then i = 2 end
  while i <= plen do
    local c, nxt = at(pat, i), at(pat, i + 1)
    if c == LPAREN then
      captures_made = captures_made + 1
      if captures_made > MAXCAPTURES then return false end
      if nxt == RPAREN then i = i + 2 else open, i = open + 1, i + 1 end
    elseif c == RPAREN then
      open = open - 1
      if open < 0 then return false end
      i = i + 1
    elseif c == DOLLAR and i == plen then
      i = i + 1
    elseif c == ESC and (nxt == byte("b") or (nxt >= byte("0") and nxt <= byte("9"))) then
      return false -- each visit may scan the whole subject
    else
      local frontier = c == ESC and nxt == byte("f")
      if frontier and at(pat, i + 2) ~= LBRACKET then return false end
      local ok, ep = pcall(class_end, { pat = pat, plen = plen }, frontier and i + 2 or i)
      if not ok then return false end
      local suffix = at(pat, ep)
      if frontier then
        suffix = 0
      elseif suffix == STAR or suffix == PLUS or suffix == DASH then
        -- linear only if what follows cannot fail: nothing, or captures closing
        if c_find(pat, "[^()]", ep + 1) then return false end
        ep = ep + 1
      elseif suffix == QUESTION then
        optional, ep = optional + 1, ep + 1
      end
      i = ep
    end
  end
  if open ~= 0 or optional > 16 then return false end
  return max(plen, 1) * 2 ^ optional
end

local linear_cost, cached = {}, 0 -- pattern -> cost or false (strings are never collected)

local function per_start(pat)
  local cost = linear_cost[pat]
  if cost == nil then
    if cached >= 256 then linear_cost, cached = {}, 0 end
    cost = analyse(pat)
    linear_cost[pat], cached = cost, cached + 1
  end
  return cost
end

-- A string argument as luaL_checklstring takes it (a number becomes a string), or nil.
local function text_arg(value)
  local t = type(value)
  if t == "string" then return value end
  if t == "number" then return tostring(value) end
  return nil
end

-- A start position as posrelatI makes it.
local function start_position(init, len)
  if init > 0 then return init end
  if init == 0 or init < -len then return 1 end
  return len + init + 1
end

-- the captures of a match, or the whole match when the pattern has none (string.match)
local function matched(text, a, b, ...)
  if not a then return nil end
  if select("#", ...) == 0 then return sub(text, a, b) end
  return ...
end

-- gsub on the Lua matcher (lstrlib.c's str_gsub, add_value and add_s); captures are read only
-- when used, as C does.
local function replacement(out, ms, a, e, repl, kind)
  local whole = sub(ms.src, a, e - 1)
  local value
  if kind == "function" then
    value = repl(captures(ms, a, e))
  elseif kind == "table" then
    value = repl[capture(ms, 1, a, e)]
  else
    local i = 1
    while true do
      local p = c_find(repl, "%", i, true)
      if not p then break end
      out[#out + 1] = sub(repl, i, p - 1)
      local d = at(repl, p + 1)
      if d == ESC then
        out[#out + 1] = "%"
      elseif d == byte("0") then
        out[#out + 1] = whole
      elseif d >= byte("1") and d <= byte("9") then
        out[#out + 1] = tostring(capture(ms, d - byte("0"), a, e))
      else
        fail("invalid use of '%' in replacement string")
      end
      i = p + 2
    end
    out[#out + 1] = sub(repl, i)
    return true
  end
  if not value then
    out[#out + 1] = whole
    return false
  end
  local t = type(value)
  if t ~= "string" and t ~= "number" then fail("invalid replacement value (a " .. t .. ")") end
  out[#out + 1] = tostring(value)
  return true
end

-- (`spend` charges a long replacement string's length per match: it is copied and scanned in C)
local function lua_gsub(text, pat, repl, limit, kind, spend)
  local len, anchor = #text, at(pat, 1) == CARET
  local out, count, changed, src, last_end = {}, 0, false, 1, nil
  local each = kind == "string" and #repl >= SMALL and #repl or 0
  while count < limit do
    local a, e, ms = lua_search(text, pat, src)
    if not a then break end
    if e ~= last_end then
      spend(each)
      out[#out + 1] = sub(text, src, a - 1)
      count = count + 1
      changed = replacement(out, ms, a, e, repl, kind) or changed
      src, last_end = e, e
    elseif a <= len then -- an empty match where the last one ended: keep one character
      out[#out + 1] = sub(text, src, a)
      src = a + 1
    else
      break
    end
    if anchor then break end
  end
  if not changed then return text, count end
  out[#out + 1] = sub(text, src)
  return table_concat(out), count
end

------------------------------------------------------------------------------------------------
-- Lua's sort (ltablib.c, 5.4), step for step, errors included, for a table whose length comes
-- from a __len metamethod: asked once, here. Where C would draw a random pivot after a badly
-- unbalanced partition, this draws none (~0, as C built without randomness): its every step is
-- counted by the hook anyway.

local RANLIMIT = 100
local NO_RANDOM = 0xFFFFFFFF

local function less(a, b) return a < b end

-- (one statement per read and write, in C's order: __index and __newindex are handler code)
local function sort_port(t, n, lt)
  local function partition(lo, up, pivot)
    local i, j = lo, up - 1
    while true do
      i = i + 1
      local a = t[i]
      while lt(a, pivot) do
        if i == up - 1 then fail("invalid order function for sorting") end
        i = i + 1
        a = t[i]
      end
      j = j - 1
      local b = t[j]
      while lt(pivot, b) do
        if j < i then fail("invalid order function for sorting") end
        j = j - 1
        b = t[j]
      end
      if j < i then
        t[up - 1] = a
        t[i] = pivot
        return i
      end
      t[i] = b
      t[j] = a
    end
  end
  local function auxsort(lo, up, rnd)
    while lo < up do
      local a = t[lo]
      local b = t[up]
      if lt(b, a) then
        t[lo] = b
        t[up] = a
      end
      if up - lo == 1 then return end
      local p
      if up - lo < RANLIMIT or rnd == 0 then
        p = (lo + up) // 2
      else
        local r4 = (up - lo) // 4
        p = rnd % (r4 * 2) + (lo + r4)
      end
      a = t[p]
      b = t[lo]
      if lt(a, b) then
        t[p] = b
        t[lo] = a
      else
        b = t[up]
        if lt(b, a) then
          t[p] = b
          t[up] = a
        end
      end
      if up - lo == 2 then return end
      local pivot = t[p]
      b = t[up - 1]
      t[p] = b
      t[up - 1] = pivot
      p = partition(lo, up, pivot)
      local smaller
      if p - lo < up - p then
        auxsort(lo, p - 1, rnd)
        smaller, lo = p - lo, p + 1
      else
        auxsort(p + 1, up, rnd)
        smaller, up = up - p, p - 1
      end
      if (up - lo) // 128 > smaller then rnd = NO_RANDOM end
    end
  end
  auxsort(1, n, 0)
end

return function(spend, remaining, raw_getmetatable)
  local bounded_string, bounded_table, bounded_utf8 = {}, {}, {}
  for k, v in next, string do bounded_string[k] = v end
  for k, v in next, table do bounded_table[k] = v end
  for k, v in next, utf8 do bounded_utf8[k] = v end
  -- called as fields, so that C's errors name them ("bad argument #1 to 'find'")
  local C = {
    find = string.find, match = string.match, gmatch = string.gmatch, gsub = string.gsub,
    rep = string.rep, format = string.format, move = table.move, insert = table.insert,
    remove = table.remove, sort = table.sort, unpack = table.unpack, concat = table.concat,
    pack = string.pack, packsize = string.packsize, byte = string.byte, char = string.char,
    date = os.date,
  }
  local C_string = { unpack = string.unpack }
  local C_utf8 = { char = utf8.char, codepoint = utf8.codepoint }


  function bounded_string.rep(...)
    local s, n, sep = ...
    local text, between, count = text_arg(s), sep == nil and "" or text_arg(sep), tointeger(n)
    if text and between and count and count > 0 then
      if #text + #between == 0 then return "" end
      spend(count + (count * 1.0 * (#text + #between)) / 8)
    end
    return C.rep(...)
  end

  function bounded_table.move(...)
    local _, f, e = ...
    local first, last = tointeger(f), tointeger(e)
    if first and last and last >= first then spend(last * 1.0 - first + 1) end
    return C.move(...)
  end

  local function has_len(t)
    local mt = raw_getmetatable(t)
    return mt ~= nil and type(mt) == "table" and rawget(mt, "__len") ~= nil
  end

  local function length(t, level) -- (level: error()'s, seen from length's caller)
    local n = tointeger(#t)
    if not n then error("object length is not an integer", level + 1) end
    return n
  end

  -- The first and last index unpack and concat work on, as C takes them: the last defaults to
  -- the length, a __len metamethod's answer asked for once (C is then handed it). Nil when an
  -- argument is not what C takes: C raises its error.
  local function span(t, i, j)
    local first = i == nil and 1 or tointeger(i)
    if not first then return nil end
    if j ~= nil then return first, tointeger(j) end
    local kind = type(t)
    if kind == "string" then return first, #t end
    if kind ~= "table" then return nil end
    if has_len(t) then return first, length(t, 3) end
    return first, rawlen(t)
  end

  -- (these are hot: the common case comes first, with as few instructions as can be)
  function bounded_table.unpack(...)
    local t, i, j = ...
    local first, last
    if j ~= nil then -- (span's, inline: the common call)
      first, last = i == nil and 1 or tointeger(i), tointeger(j)
      if not first then return C.unpack(...) end
    else
      first, last = span(t, i, j)
    end
    if not last then return C.unpack(...) end
    -- (past a million values C raises at once: the stack holds no more)
    local n = last * 1.0 - first + 1
    if n >= SMALL then spend(min(n, 1e6)) end
    return C.unpack(t, first, last)
  end

  -- concat and format are charged for what they made, once they made it: one instruction per
  -- 8 bytes (an error on the way leaves the work done, as much as the memory limit allows)
  function bounded_table.concat(...)
    local t, sep, i, j = ...
    if i ~= nil or j ~= nil or type(t) ~= "table" or raw_getmetatable(t) ~= nil then
      local first, last = span(t, i, j)
      if not last or type(t) ~= "table" then return C.concat(...) end
      local n = last * 1.0 - first + 1
      if n >= SMALL then spend(n) end
      local text = C.concat(t, sep, first, last)
      if #text >= SMALL_TEXT then spend(#text / 8) end
      return text
    end
    -- a whole table without a metatable: C takes its raw length
    local n = rawlen(t)
    if n >= SMALL then spend(n) end
    local text = C.concat(t, sep)
    if #text >= SMALL_TEXT then spend(#text / 8) end
    return text
  end

  function bounded_string.format(...)
    local text = C.format(...)
    if #text >= SMALL_TEXT then spend(#text / 8) end
    return text
  end

  local function position(value, arg, name)
    local pos = tointeger(value)
    if pos then return pos end
    local problem = tonumber(value) and "number has no integer representation" or
      "number expected, got " .. type(value)
    error(format("bad argument #%d to '%s' (%s)", arg, name, problem), 3)
  end

  function bounded_table.insert(t, ...)
    if not has_len(t) then return C.insert(t, ...) end
    local e = length(t, 2) + 1 -- first empty element
    local nargs = select("#", ...)
    if nargs == 1 then
      t[e] = ...
      return
    end
    if nargs ~= 2 then error("wrong number of arguments to 'insert'", 2) end
    local pos, value = ...
    pos = position(pos, 2, "insert")
    if not ult(pos - 1, e) then
      error("bad argument #2 to 'insert' (position out of bounds)", 2)
    end
    for i = e, pos + 1, -1 do t[i] = t[i - 1] end
    t[pos] = value
  end

  function bounded_table.remove(t, ...)
    if not has_len(t) then return C.remove(t, ...) end
    local size = length(t, 2)
    local pos = ...
    if pos == nil then pos = size else pos = position(pos, 2, "remove") end
    if pos ~= size and ult(size, pos - 1) then
      error("bad argument #2 to 'remove' (position out of bounds)", 2)
    end
    local result = t[pos]
    while pos < size do
      t[pos] = t[pos + 1]
      pos = pos + 1
    end
    t[pos] = nil
    return result
  end

  local function type_name(value)
    local mt = raw_getmetatable(value)
    local name = type(mt) == "table" and rawget(mt, "__name")
    return type(name) == "string" and name or type(value)
  end

  function bounded_table.sort(...)
    local t, comp = ...
    if type(t) ~= "table" then return C.sort(...) end
    if not has_len(t) then
      local n = rawlen(t)
      if n > 1 then spend(n * log(n, 2)) end
      return C.sort(...)
    end
    local n = length(t, 2)
    if n <= 1 then return end
    if n >= 0x7FFFFFFF then error("bad argument #1 to 'sort' (array too big)", 2) end
    if comp ~= nil and type(comp) ~= "function" then
      error(format("bad argument #2 to 'sort' (function expected, got %s)", type_name(comp)), 2)
    end
    return rethrow(pcall(sort_port, t, n, comp or less))
  end

  -- A search at or after `init` (a position) for a pattern with specials (C's find takes one
  -- without as plain text), in C if linear and affordable, charged what it scanned: true and
  -- find's results; or false: it must run on the Lua matcher.
  local function c_search(s, p, init)
    local cost = per_start(p)
    if not cost then return false end
    local len = #s
    local worst = (at(p, 1) == CARET and 1 or len - init + 2) * cost + len
    if worst > remaining() then return false end
    local function paid(a, b, ...)
      if not a then
        spend(worst)
        return true, nil
      end
      spend((a - init + 1) * cost + (b - a + 1))
      return true, a, b, ...
    end
    return paid(c_find(s, p, init))
  end

  -- A plain search, in C: at once when its worst case is affordable, else window by window,
  -- each paid before it runs.
  local function plain_search(s, p, init)
    local len, plen = #s, max(#p, 1)
    local worst = (len - init + 2) * plen
    if worst <= remaining() then
      local a, b = c_find(s, p, init, true)
      spend(a and (a - init + 1) * plen or worst)
      if a then return a, b end
      return nil
    end
    local window = max(1, WINDOW // plen)
    for start = init, len - #p + 1, window do
      spend(window * plen)
      local a = c_find(sub(s, start, start + window + #p - 2), p, 1, true)
      if a then return start + a - 1, start + a + #p - 2 end
    end
    return nil
  end

  -- a pattern the matcher reads as plain text: no special character, no ')' either
  local function literal(pat)
    return not c_find(pat, SPECIALS) and not c_find(pat, ")", 1, true)
  end

  local function search_args(s, p, init)
    local text, pat, pos = text_arg(s), text_arg(p), init == nil and 1 or tointeger(init)
    if not (text and pat and pos) then return nil end
    return text, pat, start_position(pos, #text)
  end

  -- finish(text, find's results) of a search at pos: plain, in C, or on the Lua matcher (called
  -- in tail position, so that rethrow gives the matcher's errors the caller's line)
  local function searched(finish, text, pat, pos, plain)
    if plain then return finish(text, plain_search(text, pat, pos)) end
    local ran = table_pack(c_search(text, pat, pos))
    if ran[1] then return finish(text, table_unpack(ran, 2, ran.n)) end
    return rethrow(pcall(function() return finish(text, lua_find(text, pat, pos)) end))
  end

  local function found(_, ...) return ... end

  function bounded_string.find(...)
    local s, p, init, plain = ...
    local text, pat, pos = search_args(s, p, init)
    if not text then return C.find(...) end -- C raises the argument's error
    if pos > #text + 1 then return nil end
    return searched(found, text, pat, pos, plain or not c_find(pat, SPECIALS))
  end

  function bounded_string.match(...)
    local s, p, init = ...
    local text, pat, pos = search_args(s, p, init)
    if not text then return C.match(...) end
    if pos > #text + 1 then return nil end
    return searched(matched, text, pat, pos, literal(pat))
  end

  function bounded_string.gmatch(...)
    local s, p, init = ...
    local text, pat, pos = search_args(s, p, init)
    if not text then return C.gmatch(...) end
    -- gmatch does not anchor: a leading '^' is a plain character there
    if at(pat, 1) == CARET then pat = "%" .. pat end
    local plain = literal(pat)
    if pos > #text + 1 then pos = #text + 2 end
    local last_end -- where the previous match ended: an empty match there is skipped
    return function()
      while pos <= #text + 1 do
        local found
        if plain then
          found = table_pack(plain_search(text, pat, pos))
        else
          found = table_pack(c_search(text, pat, pos))
          if found[1] then
            found = table_pack(table_unpack(found, 2, found.n))
          else
            found = table_pack(pcall(lua_find, text, pat, pos))
            if not found[1] then reraise(found[2], 2) end
            found = table_pack(table_unpack(found, 2, found.n))
          end
        end
        local a, b = found[1], found[2]
        if not a then break end
        if b + 1 ~= last_end then
          pos, last_end = b + 1, b + 1
          if found.n == 2 then return sub(text, a, b) end
          return table_unpack(found, 3, found.n)
        end
        pos = a + 1
      end
      pos = #text + 2
    end
  end

  function bounded_string.gsub(...)
    local s, p, repl, n = ...
    local text, pat, limit = text_arg(s), text_arg(p), n == nil and nil or tointeger(n)
    local kind = type(repl)
    if not (text and pat and (n == nil or limit) and (kind == "string" or kind == "number" or
        kind == "function" or kind == "table")) then
      return C.gsub(...) -- C raises the argument's error
    end
    limit = limit or #text + 1
    if kind == "number" then repl, kind = tostring(repl), "string" end
    local cost = per_start(pat)
    if cost then
      local worst = (at(pat, 1) == CARET and 1 or #text + 1) * cost + #text
      local each = kind == "string" and #repl or 0 -- C copies and scans it at each match
      if worst + each * max(min(limit, #text + 1), 0) <= remaining() then
        if each == 0 or c_find(repl, "%", 1, true) then
          spend(worst + each * max(min(limit, #text + 1), 0))
          return C.gsub(...)
        end
        -- plain text: C raises no error, so charge the matches made (and the scan above)
        local result, count = C.gsub(...)
        spend(worst + each * (count + 1))
        return result, count
      end
    end
    return rethrow(pcall(lua_gsub, text, pat, repl, limit, kind, spend))
  end

  local function format_cost(fmt)
    local text = text_arg(fmt)
    return text and #text * FORMAT or 0
  end

  function bounded_string.pack(...)
    local fmt = text_arg((...))
    if fmt then
      local sizes = 0
      for digits in c_gmatch(fmt, "%d+") do sizes = sizes + tonumber(digits) end
      local cost = #fmt * FORMAT + sizes
      if cost >= SMALL then spend(cost) end
    end
    local text = C.pack(...)
    if #text >= SMALL_TEXT then spend(#text / 8) end
    return text
  end

  function bounded_string.packsize(...)
    local cost = format_cost((...))
    if cost >= SMALL then spend(cost) end
    return C.packsize(...)
  end

  function bounded_string.unpack(...)
    local cost = format_cost((...))
    if cost >= SMALL then spend(cost) end
    return C_string.unpack(...)
  end

  -- string.byte and utf8.codepoint: one per value they give at most, i and j as C takes them
  -- (without j, one value; past a million values C raises at once, as unpack)
  local function pay_for_values(s, i, j)
    if j == nil then return end
    local text, first, last = text_arg(s), i == nil and 1 or tointeger(i), tointeger(j)
    if not (text and first and last) then return end
    local len = #text
    first = start_position(first, len)
    if last > len then
      last = len
    elseif last < 0 then
      last = last < -len and 0 or len + last + 1
    end
    local n = last * 1.0 - first + 1
    if n >= SMALL then spend(min(n, 1e6)) end
  end

  function bounded_string.byte(...)
    pay_for_values(...)
    return C.byte(...)
  end

  function bounded_utf8.codepoint(...)
    pay_for_values(...)
    return C_utf8.codepoint(...)
  end

  function bounded_string.char(...)
    local n = select("#", ...)
    if n >= SMALL then spend(n) end
    return C.char(...)
  end

  function bounded_utf8.char(...)
    local n = select("#", ...) * FORMAT
    if n >= SMALL then spend(n) end
    return C_utf8.char(...)
  end

  local function date(...)
    local fmt = text_arg((...))
    if fmt and #fmt * DATE >= SMALL then spend(#fmt * DATE) end
    return C.date(...)
  end

  return bounded_string, bounded_table, bounded_utf8, date
end

-- Sends emails (by logging them) and publishes a receipt for each one.

local queue = require("queue")

-- Module-level state: loaded once, shared by every invocation of this handler.
local attempts = {}

local function send(to, template)
  -- A stand-in for a mail API: addresses at flaky.example fail on their first attempt.
  if to:find("@flaky%.example$") and not attempts[to] then
    attempts[to] = true
    return nil, errors.new({ message = "mail server busy", kind = errors.UNAVAILABLE,
      retryable = true })
  end
  return true
end

function handle_email(payload)
  local msg, err = queue.message()
  if err then
    return nil, err
  end

  logger:info("Processing", {
    message_id = msg:id(),
    to = payload.to,
    priority = msg:header("priority"),
  })

  local ok, send_err = send(payload.to, payload.template)
  if send_err then
    return nil, send_err -- Message will be requeued and delivered again
  end

  local published, publish_err = queue.publish("app:receipts", {
    to = payload.to,
    template = payload.template,
    email_id = msg:id(),
  }, {
    priority = msg:header("priority") or "normal",
    correlation_id = msg:header("correlation_id") or msg:id(),
  })
  if publish_err then
    return nil, publish_err
  end
end

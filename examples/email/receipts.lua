-- Records receipts published by the email handler.

local count = 0

function record_receipt(receipt)
  count = count + 1
  local msg = queue.message()
  logger:info("Receipt", {
    to = receipt.to,
    correlation_id = msg:header("correlation_id"),
    priority = msg:header("priority"),
    total = count,
  })
end

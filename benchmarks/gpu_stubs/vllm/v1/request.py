import enum


class RequestStatus(enum.IntEnum):  # only compared against in the scheduler half, which the GPU runs do not use
    FINISHED_ABORTED = 1
